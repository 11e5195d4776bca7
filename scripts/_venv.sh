# Sourced by scripts/*: creates .venv and installs the project (with extras) when needed.
ensure_venv() {
  local extras="${1:-}"
  local stamp=".venv/.installed-${extras:-base}"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install --quiet --upgrade pip
    if [ -n "$extras" ]; then
      .venv/bin/pip install --quiet -e ".[$extras]"
    else
      .venv/bin/pip install --quiet -e .
    fi
    touch "$stamp"
  fi
}
