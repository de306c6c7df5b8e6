#!/usr/bin/env bash
# Print the path of a Python >= 3.12 on this machine: PATH first, then pyenv's installed versions.
set -euo pipefail
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
for c in python3.12 python3.13 python3 python; do
  p=$(command -v "$c" 2>/dev/null) || continue
  if ok "$p"; then echo "$p"; exit 0; fi
done
roots=()
command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
roots+=("${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv /usr/local/pyenv /opt/pyenv)
for r in "${roots[@]}"; do
  [ -d "$r/versions" ] || continue
  for p in $(ls -d "$r"/versions/3.1[2-9]* 2>/dev/null | sort -V); do
    if [ -x "$p/bin/python" ] && ok "$p/bin/python"; then echo "$p/bin/python"; exit 0; fi
  done
done
for p in /usr/bin/python3.1[2-9] /usr/local/bin/python3.1[2-9]; do
  [ -x "$p" ] && ok "$p" && { echo "$p"; exit 0; }
done
echo "no Python >= 3.12 found: install one (e.g. 'pyenv install 3.12') and retry" >&2
exit 1
