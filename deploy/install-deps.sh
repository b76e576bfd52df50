#!/usr/bin/env bash
# Installs what dongbo's demo, tests and benchmarks need on a Debian/Ubuntu machine, and nothing that
# is already there: PostgreSQL server binaries (the harness makes throw-away clusters with initdb), the
# `postgres` OS user (initdb refuses to run as root), pg_recvlogical (the capture benchmark's floor),
# OpenSSL headers and pkg-config (the bundled librdkafka is built with TLS and SASL/SCRAM) and the
# openssl tool (the tests make a CSR with it, as the README's enrolment steps do),
# MariaDB server and client (the harness makes throw-away servers for the MySQL/MariaDB source),
# rpm and cpio (the legacy agent's .rpm is built and unpacked by the tests),
# unixODBC and Debian's MariaDB and PostgreSQL ODBC drivers (the ODBC polling test and build).
# tansu, the Kafka-API broker of the Kafka tests (with --kafka-broker).
# Rust itself must already be installed (https://rustup.rs).
set -euo pipefail

have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v pg_recvlogical >/dev/null 2>&1; }

if ! have_pg || ! id postgres >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing PostgreSQL server binaries (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql postgresql-client >/dev/null
fi
id postgres >/dev/null 2>&1 || { echo "no postgres user after installing postgresql" >&2; exit 1; }

if ! command -v pkg-config >/dev/null 2>&1 || ! pkg-config --exists openssl || ! command -v openssl >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing OpenSSL headers, pkg-config (librdkafka's TLS) and the openssl tool (the CSR tests) (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libssl-dev pkg-config openssl >/dev/null
fi

if ! command -v mariadb-install-db >/dev/null 2>&1 || ! command -v mariadbd >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing MariaDB server and client (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mariadb-server mariadb-client >/dev/null
fi

if ! command -v rpmbuild >/dev/null 2>&1 || ! command -v rpm2cpio >/dev/null 2>&1 || ! command -v cpio >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing rpm and cpio (the legacy agent's .rpm is built and unpacked in the tests) (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq rpm cpio >/dev/null
fi

if ! command -v odbcinst >/dev/null 2>&1 || ! pkg-config --exists odbc 2>/dev/null || ! odbcinst -q -d 2>/dev/null | grep -q "MariaDB Unicode"; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing unixODBC and the MariaDB and PostgreSQL ODBC drivers (the ODBC polling test) (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq unixodbc unixodbc-dev odbc-mariadb odbc-postgresql >/dev/null
fi

if ! command -v promtool >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing promtool (Debian's prometheus package, without its recommends: the alert rules' tests) (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing headless Chromium and its WebDriver (the dashboard's browser test) (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust from https://rustup.rs first" >&2
  exit 1
fi

# With --kafka-broker (the test command passes it; the quick start, which runs without Kafka, does not):
# the Kafka tests' real Kafka-API broker, tansu, from crates.io (10-16 minutes to build here, so an
# installed one is reused). Its libsql feature gives the sqlite:// storage the tests use.
if [ "${1:-}" = "--kafka-broker" ] && ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  echo "== installing tansu (a Kafka-API broker; builds from source, 10-16 minutes)"
  cargo install tansu --locked --features libsql
fi
