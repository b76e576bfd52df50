#!/usr/bin/env bash
# dongbo in one command: installs what is missing, builds, makes two throw-away PostgreSQL clusters (a
# provincial population database and the NDC), starts the hub and an agent on the embedded default
# (gRPC over mutual TLS with certificates from a throw-away CA it makes, no Kafka), loads 10 000 citizens with real 2025 commune codes, and shows a citizen's residence
# change arriving in the NDC and, as a `residence.changed` event, at two subscribers: social insurance
# over gRPC and health insurance over a signed webhook, each with only its purpose's fields. Ends with
# the audit log answering the citizen's question "who received my data".
#
#   ./deploy/quickstart.sh          run the demo, then stop everything
#   ./deploy/quickstart.sh --keep   leave hub, agent and clusters running to explore (.dongbo/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.dongbo/demo
KEEP=${1:-}
PROVINCE_PORT=${PROVINCE_PORT:-55432}
NDC_PORT=${NDC_PORT:-55433}
HUB_PORT=${HUB_PORT:-57443}
ADMIN_PORT=${ADMIN_PORT:-57444}
WEBHOOK_PORT=${WEBHOOK_PORT:-58088}
PASSWORD=demo-secret

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
asuser() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

say "installing what is missing"
./deploy/install-deps.sh
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

say "building dongbo (release; the first build takes a few minutes)"
cargo build --release --bins --quiet
BIN=$ROOT/target/release

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for c in province ndc; do
    [ -d "$DEMO/$c" ] && asuser "$PGBIN/pg_ctl" -D "$DEMO/$c" -m fast -w stop >/dev/null 2>&1 || true
  done
}
if [ "$KEEP" != "--keep" ]; then trap cleanup EXIT; fi

cleanup
rm -rf "$DEMO"
mkdir -p "$DEMO"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DEMO"

make_cluster() { # name port
  local dir=$DEMO/$1
  echo "$PASSWORD" >"$DEMO/pw" && { [ "$(id -u)" -ne 0 ] || chown postgres "$DEMO/pw"; }
  asuser "$PGBIN/initdb" -D "$dir" -U postgres -E UTF8 --no-locale --auth-local=trust \
    --auth-host=scram-sha-256 --pwfile="$DEMO/pw" >/dev/null
  cat >>"$dir/postgresql.conf" <<CONF
port = $2
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DEMO'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
CONF
  asuser "$PGBIN/pg_ctl" -D "$dir" -l "$DEMO/$1.log" -w start >/dev/null
  psql -h "$DEMO" -p "$2" -U postgres -qc "CREATE ROLE dongbo LOGIN REPLICATION PASSWORD '$PASSWORD'"
  psql -h "$DEMO" -p "$2" -U postgres -qc "CREATE DATABASE $3 OWNER dongbo"
}
say "making throw-away clusters: province (port $PROVINCE_PORT) and NDC (port $NDC_PORT)"
make_cluster province "$PROVINCE_PORT" population
make_cluster ndc "$NDC_PORT" ndc
src() { PGPASSWORD=$PASSWORD psql -h 127.0.0.1 -p "$PROVINCE_PORT" -U dongbo population -qAt "$@"; }
ndc() { PGPASSWORD=$PASSWORD psql -h 127.0.0.1 -p "$NDC_PORT" -U dongbo ndc "$@"; }

say "loading 10 000 citizens of Thành phố Hồ Chí Minh into the provincial database"
CSV=$ROOT/../shared/data/admin-units/communes_2025.csv
if [ -f "$CSV" ]; then
  COMMUNES=$(awk -F, '$1=="79" {printf "%s\x27%s|%s\x27", (n++ ? "," : ""), $3, $4}' "$CSV")
else
  COMMUNES="'25882|Xã Phước Hòa','26704|Phường Phú Mỹ'"
fi
src <<SQL
CREATE TABLE citizens (
  citizen_id char(12) PRIMARY KEY, full_name text NOT NULL, birth_date date, gender smallint,
  province_code varchar(2), commune_code varchar(5), address text, residence_kind text,
  updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO citizens
SELECT lpad((79000000000 + g * 7919 % 1000000000)::text, 12, '0'),
       (ARRAY['Nguyễn','Trần','Lê','Phạm','Võ'])[1 + g % 5] || ' ' || (ARRAY['Văn','Thị','Minh'])[1 + g % 3] || ' ' ||
       (ARRAY['An','Bình','Châu','Dũng','Linh','Mai'])[1 + g % 6],
       DATE '1960-01-01' + g % 20000, g % 2, '79', split_part(c, '|', 1),
       'Số ' || (g % 300 + 1) || ' đường Nguyễn Huệ, ' || split_part(c, '|', 2) || ', Thành phố Hồ Chí Minh', 'thường trú', now()
FROM generate_series(1, 10000) g,
     LATERAL (SELECT (ARRAY[$COMMUNES])[1 + g % array_length(ARRAY[$COMMUNES], 1)] AS c) x;
SQL

say "making a throw-away CA and certificates for the hub, the agent and social insurance (dongbo-hub certs)"
PKI="$DEMO/pki"
"$BIN/dongbo-hub" certs ca --dir "$PKI/ca" --name "dongbo quick-start CA"
"$BIN/dongbo-hub" certs issue --ca-dir "$PKI/ca" --kind hub --id hub --host localhost --host 127.0.0.1 --out "$PKI/hub"
"$BIN/dongbo-hub" certs issue --ca-dir "$PKI/ca" --kind agent --id hcm-population --out "$PKI/hcm-population"
"$BIN/dongbo-hub" certs issue --ca-dir "$PKI/ca" --kind subscriber --id bhxh --out "$PKI/bhxh"

cat >"$DEMO/hub.toml" <<TOML
listen = "127.0.0.1:$HUB_PORT"

# Mutual TLS: the agent and the gRPC subscriber present certificates signed by the demo CA, and
# their tokens, and both must name the same peer.
[tls]
cert_file = "$PKI/hub.pem"
key_file = "$PKI/hub.key"
client_ca_file = "$PKI/ca/ca.pem"

[ndc]
host = "127.0.0.1"
port = $NDC_PORT
database = "ndc"
user = "dongbo"
password = "$PASSWORD"

[fanout]
data_dir = "$DEMO/hub-data"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"
token = "demo-admin-token"

[audit]
checkpoint_interval_s = 1

[[agents]]
id = "hcm-population"
token = "demo-token"
province = "79"

# The national data dictionary: what subscribers may follow.
[[dictionary]]
table = "public.citizens"
citizen_id = "citizen_id"
fields = ["citizen_id", "full_name", "birth_date", "gender", "province_code", "commune_code", "address", "residence_kind"]

[[events]]
name = "residence.changed"
table = "public.citizens"
watch = ["commune_code", "address"]
carry = ["residence_kind", "province_code"]

[[purposes]]
id = "social-insurance"
description = "Social insurance contributions and benefits (Law on Social Insurance 41/2024/QH15)"
[purposes.allows]
"residence.changed" = ["citizen_id", "previous.commune_code", "current.commune_code", "residence_kind", "effective_at"]

[[purposes]]
id = "health-insurance"
description = "Health insurance card registration place (Law on Health Insurance 51/2024/QH15)"
[purposes.allows]
"residence.changed" = ["citizen_id", "current.commune_code", "current.address", "effective_at"]

[[subscribers]]
id = "bhxh"
token = "demo-bhxh-token"

[[subscribers]]
id = "bhyt"
token = "demo-bhyt-token"

[[subscriptions]]
id = "bhxh-residence"
subscriber = "bhxh"
purpose = "social-insurance"
follow = ["residence.changed"]
fields = ["citizen_id", "previous.commune_code", "current.commune_code", "residence_kind", "effective_at"]
delivery = { kind = "grpc" }

[[subscriptions]]
id = "bhyt-residence"
subscriber = "bhyt"
purpose = "health-insurance"
follow = ["residence.changed"]
fields = ["citizen_id", "current.commune_code", "current.address"]
delivery = { kind = "webhook", url = "http://127.0.0.1:$WEBHOOK_PORT/dongbo", secret = "demo-webhook-secret" }
TOML
cat >"$DEMO/agent.toml" <<TOML
source_id = "hcm-population"

[source]
kind = "postgres"
host = "127.0.0.1"
port = $PROVINCE_PORT
database = "population"
user = "dongbo"
password = "$PASSWORD"
tables = ["public.citizens"]

[spool]
path = "$DEMO/spool"

[hub]
url = "https://localhost:$HUB_PORT"
token = "demo-token"
ca_file = "$PKI/ca/ca.pem"
cert_file = "$PKI/hcm-population.pem"
key_file = "$PKI/hcm-population.key"
TOML

say "checking the provincial server (dongbo-agent check)"
"$BIN/dongbo-hub" serve --config "$DEMO/hub.toml" >"$DEMO/hub.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$HUB_PORT") 2>/dev/null && break; sleep 0.1; done
"$BIN/dongbo-agent" check --config "$DEMO/agent.toml"

say "starting the agent: initial snapshot, then streaming"
"$BIN/dongbo-agent" run --config "$DEMO/agent.toml" >"$DEMO/agent.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do
  n=$(ndc -qAtc "SELECT count(*) FROM hcm_population.citizens" 2>/dev/null || echo 0)
  [ "$n" = "10000" ] && break
  sleep 0.1
done
echo "NDC now holds $(ndc -qAtc 'SELECT count(*) FROM hcm_population.citizens') citizens of the province"

ID=$(src -c "SELECT citizen_id FROM citizens ORDER BY citizen_id LIMIT 1")
say "starting two subscribers: social insurance (gRPC) and health insurance (webhook)"
# Secrets come from files or the environment, never from arguments (readable in any process list).
DONGBO_SUBSCRIBER_TOKEN=demo-bhxh-token "$BIN/social-insurance" --hub "https://localhost:$HUB_PORT" --subscription bhxh-residence \
  --ca-file "$PKI/ca/ca.pem" --cert-file "$PKI/bhxh.pem" --key-file "$PKI/bhxh.key" \
  --count 1 >"$DEMO/social-insurance.out" 2>"$DEMO/social-insurance.log" &
SI_PID=$!
PIDS+=($SI_PID)
DONGBO_WEBHOOK_SECRET=demo-webhook-secret "$BIN/health-webhook" --listen "127.0.0.1:$WEBHOOK_PORT" --count 1 \
  >"$DEMO/health.out" 2>"$DEMO/health.log" &
HW_PID=$!
PIDS+=($HW_PID)
sleep 0.5

say "citizen $ID in the NDC before moving"
ndc -c "SELECT citizen_id, full_name, province_code, commune_code, address FROM hcm_population.citizens WHERE citizen_id = '$ID'"

say "the citizen moves to Phường Ba Đình, Hà Nội (commune 00004): declared once, in the provincial database"
T0=$(date +%s%N)
src -c "UPDATE citizens SET province_code = '01', commune_code = '00004', residence_kind = 'thường trú',
        address = 'Số 1 phố Điện Biên Phủ, Phường Ba Đình, Thành phố Hà Nội', updated_at = now()
        WHERE citizen_id = '$ID'"
for _ in $(seq 500); do
  [ "$(ndc -qAtc "SELECT commune_code FROM hcm_population.citizens WHERE citizen_id = '$ID'")" = "00004" ] && break
  sleep 0.01
done
T1=$(date +%s%N)
ndc -c "SELECT citizen_id, full_name, province_code, commune_code, address FROM hcm_population.citizens WHERE citizen_id = '$ID'"
echo "the change reached the NDC in $(( (T1 - T0) / 1000000 )) ms (including psql start-up)"
say "what the hub recorded"
ndc -c "SELECT source_id, applied_seq, source_position, changes_applied, changes_quarantined FROM dongbo.applied_position"

say "the subscribers received residence.changed, each with only what its purpose allows"
for _ in $(seq 100); do [ -s "$DEMO/social-insurance.out" ] && [ -s "$DEMO/health.out" ] && break; sleep 0.1; done
cat "$DEMO/social-insurance.out" "$DEMO/health.out"

say "the citizen asks: which systems received my data, when, and for what purpose? (dongbo-hub audit citizen)"
"$BIN/dongbo-hub" audit --config "$DEMO/hub.toml" citizen "$ID"
sleep 2 # one signed checkpoint of the audit chain (every second in this demo)
"$BIN/dongbo-hub" audit --config "$DEMO/hub.toml" verify

if [ "$KEEP" = "--keep" ]; then
  say "still running (logs and configs in $DEMO); stop with: kill ${PIDS[*]}"
else
  say "done; everything stops now (run with --keep to explore)"
fi
