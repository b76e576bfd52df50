#!/usr/bin/env bash
# Packages the legacy agent (target/legacy/dongbo-agent, from deploy/build-legacy.sh) as a .deb and
# an .rpm for the provinces' old servers, each with:
#   /usr/bin/dongbo-agent
#   /lib/systemd/system/dongbo-agent.service   (deploy/systemd's unit, pointed at /usr/bin)
#   /etc/dongbo/agent.toml                     (deploy/examples/agent.toml; kept on upgrade)
#   /var/lib/dongbo                            (the spool, owned by the dongbo system user)
# The install creates the dongbo user and enables nothing: provincial IT edits agent.toml, runs
# `dongbo-agent check --config /etc/dongbo/agent.toml`, then `systemctl enable --now dongbo-agent`.
#
#   ./deploy/package-legacy.sh   → target/legacy/dongbo-agent_<version>_amd64.deb, dongbo-agent-<version>-1.x86_64.rpm
set -euo pipefail
cd "$(dirname "$0")/.."

exe=target/legacy/dongbo-agent
[ -x "$exe" ] || { echo "error: $exe is missing: run ./deploy/build-legacy.sh first" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
out="$PWD/target/legacy"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The tree both packages install.
root="$stage/root"
install -D -m 0755 "$exe" "$root/usr/bin/dongbo-agent"
install -d -m 0755 "$root/lib/systemd/system"
sed 's|/usr/local/bin/|/usr/bin/|g' deploy/systemd/dongbo-agent.service >"$root/lib/systemd/system/dongbo-agent.service"
chmod 0644 "$root/lib/systemd/system/dongbo-agent.service"
install -D -m 0640 deploy/examples/agent.toml "$root/etc/dongbo/agent.toml"
install -d -m 0750 "$root/var/lib/dongbo"

postinst='getent group dongbo >/dev/null || groupadd --system dongbo
getent passwd dongbo >/dev/null || useradd --system --gid dongbo --home-dir /var/lib/dongbo --shell /sbin/nologin dongbo
chown dongbo:dongbo /var/lib/dongbo
chgrp dongbo /etc/dongbo/agent.toml
command -v systemctl >/dev/null && systemctl daemon-reload || true
echo "dongbo-agent installed: edit /etc/dongbo/agent.toml, run dongbo-agent check --config /etc/dongbo/agent.toml, then systemctl enable --now dongbo-agent"'
prerm='command -v systemctl >/dev/null && systemctl stop dongbo-agent 2>/dev/null || true'
description="dongbo change-capture agent (legacy build: glibc 2.17 and later, gRPC transport)"

# .deb
deb="$stage/deb"
cp -a "$root" "$deb"
mkdir -p "$deb/DEBIAN"
cat >"$deb/DEBIAN/control" <<EOF
Package: dongbo-agent
Version: $version
Architecture: amd64
Maintainer: dongbo <dongbo@localhost>
Depends: libc6 (>= 2.17)
Section: database
Priority: optional
Description: $description
 Captures every committed row change beside a local PostgreSQL or MariaDB server,
 spools it durably and ships it to the dongbo hub of the National Data Center.
EOF
echo /etc/dongbo/agent.toml >"$deb/DEBIAN/conffiles"
printf '#!/bin/sh\nset -e\n%s\n' "$postinst" >"$deb/DEBIAN/postinst"
printf '#!/bin/sh\n%s\n' "$prerm" >"$deb/DEBIAN/prerm"
chmod 0755 "$deb/DEBIAN/postinst" "$deb/DEBIAN/prerm"
dpkg-deb --root-owner-group --build "$deb" "$out/dongbo-agent_${version}_amd64.deb" >/dev/null

# .rpm, from the same tree.
if ! command -v rpmbuild >/dev/null; then
  echo "error: rpmbuild is missing: ./deploy/install-deps.sh installs it (Debian package rpm)" >&2
  exit 1
fi
cat >"$stage/dongbo-agent.spec" <<EOF
Name: dongbo-agent
Version: $version
Release: 1
Summary: $description
License: Apache-2.0
BuildArch: x86_64
Requires: glibc >= 2.17
AutoReqProv: no
%description
Captures every committed row change beside a local PostgreSQL or MariaDB server,
spools it durably and ships it to the dongbo hub of the National Data Center.
%install
cp -a $root/. %{buildroot}/
%pre
getent group dongbo >/dev/null || groupadd --system dongbo
getent passwd dongbo >/dev/null || useradd --system --gid dongbo --home-dir /var/lib/dongbo --shell /sbin/nologin dongbo
exit 0
%post
$postinst
%preun
$prerm
%files
%attr(0755,root,root) /usr/bin/dongbo-agent
%attr(0644,root,root) /lib/systemd/system/dongbo-agent.service
%dir %attr(0755,root,root) /etc/dongbo
%config(noreplace) %attr(0640,root,dongbo) /etc/dongbo/agent.toml
%dir %attr(0750,dongbo,dongbo) /var/lib/dongbo
EOF
rpmbuild --quiet -bb "$stage/dongbo-agent.spec" \
  --define "_topdir $stage/rpmbuild" --define "_rpmdir $out" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  --define "__strip /bin/true" --define "debug_package %{nil}"
echo "packaged $out/dongbo-agent_${version}_amd64.deb and $out/dongbo-agent-${version}-1.x86_64.rpm"
