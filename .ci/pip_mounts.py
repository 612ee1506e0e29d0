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
    config = configparser.ConfigParser(interpolation=None)
    paths = set()
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        section = "global" if section in (":env:", "") else section
        value = shlex.split(value)[0] if value.strip() else ""
        config.setdefault(section, {})[name] = value
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                paths.add(path.parent if word.startswith("file://") else path)
    conf = Path(folder) / "pip.conf"
    with conf.open("w") as f:
        config.write(f)
    print(f"{conf.resolve()}:/etc/pip.conf:ro")
    for path in sorted(paths):
        print(f"{path.resolve()}:{path}:ro")


if __name__ == "__main__":
    main(sys.argv[1])
