#!/usr/bin/env bash
# Install the system packages the test suite uses, when we can (root + apt-get). Never fails the build:
# tests that need a missing tool skip with a message naming the package.
set -u
want=(rsync openssh-client openssh-sftp-server nginx-light)
missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: not root (or no apt-get); tests needing ${missing[*]} will skip" >&2
  exit 0
fi
echo "installing system packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
  || echo "warning: could not install ${missing[*]}; dependent tests will skip" >&2
exit 0
