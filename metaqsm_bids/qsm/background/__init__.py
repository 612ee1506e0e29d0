"""Stage 3, background field removal: total field -> local field. One module per method
(:mod:`.resharp`, :mod:`.vsharp`, :mod:`.pdf`), what they share in :mod:`.common`, and the
methods by name in :mod:`.registry`, which imports them (no method imports the registry)."""
