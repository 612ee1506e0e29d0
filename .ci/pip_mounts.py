"""This machine's pip configuration for ``podman build``: one merged pip.conf and the local paths it names.

``pip config list`` gives the effective settings (every configuration file, then the PIP_* variables);
they are written, as they are, to ``<folder>/pip.conf``, and one ``-v SRC:SRC:ro`` line is printed for
that file (mounted at /etc/pip.conf) and for every existing local file or folder a setting names (the
find-links wheel folder, the CA bundle, a constraints file; for a file:// index, the folder above it,
as its pages link to ../../files/). Mounted at build time,
not copied: nothing of the host's configuration ends up in the image.

Usage: python .ci/pip_mounts.py FOLDER > mounts.txt
"""
import configparser
import shlex
import subprocess
import sys
from pathlib import Path


def main(folder):
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            check=True).stdout
    settings, paths = {}, set()
    # the files' settings come merged, one line each; the PIP_* variables (":env:") override them, as in pip
    for line in sorted(listed.splitlines(), key=lambda line: line.startswith(":env:")):
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        section = "global" if section in (":env:", "") else section
        if name == "config-file":  # PIP_CONFIG_FILE: a file read here, not a setting (its settings are listed)
            continue
        value = shlex.split(value)[0] if value.strip() else ""
        settings.setdefault(section, {})[name] = value
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                paths.add(path.parent if word.startswith("file://") else path)
    config = configparser.ConfigParser(interpolation=None)
    config.read_dict(settings)
    conf = Path(folder) / "pip.conf"
    with conf.open("w") as f:
        config.write(f)
    print(f"{conf.resolve()}:/etc/pip.conf:ro")
    for path in sorted(paths):
        print(f"{path.resolve()}:{path}:ro")


if __name__ == "__main__":
    main(sys.argv[1])
