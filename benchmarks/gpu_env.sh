# Source on a GPU host whose Python lacks nanollm's pins (see DESIGN.md): installs the wheels
# carried in .whl/ into /tmp/site and puts them, and this checkout, first on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
