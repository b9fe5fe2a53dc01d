#!/bin/sh
# Debian's Chromium for the viewer's browser test (tests/test_viewer.py drives /usr/bin/chromium with
# Playwright; `playwright install` is never run: it downloads). Called by `make install`; safe to rerun.
# As root with apt-get it installs the package; otherwise it prints one line saying how. A failed
# install stops make under CI=true, and is one warning line elsewhere (the demos do not need it).
set -u
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser: installing chromium with apt-get (for the viewer's browser test)"
  if DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && [ -x "$CHROMIUM" ]; then
    exit 0
  fi
  echo "setup_browser: apt-get install -y chromium did not give $CHROMIUM; the viewer's browser test will skip (fail under CI=true)" >&2
  [ "${CI:-}" = true ] && exit 1
  exit 0
fi
echo "setup_browser: $CHROMIUM is missing; install Debian's chromium (sudo apt-get install -y chromium), or the viewer's browser test skips (fails under CI=true)"
