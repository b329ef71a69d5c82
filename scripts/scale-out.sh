#!/usr/bin/env bash
# Scale-out check: two `kesh server` processes sharing one SoftHSM token behind nginx `stream`
# with `least_conn`, TLS passed through to kesh (kesh terminates mTLS). docs/scale-out.md
# describes the topology; this script proves it on one machine, on loopback only.
#
#   scripts/scale-out.sh            # builds and uses the debug kesh (`cargo build`, honours CARGO_TARGET_DIR)
#   KESH_BIN=/path/to/kesh scripts/scale-out.sh
#   KEEP=1 scripts/scale-out.sh             # keep the temporary directory (logs) for inspection
#
# What it does, all inside one temporary directory that it removes on exit:
#   1. installs nginx and its stream module with apt-get when missing;
#   2. creates a throwaway SoftHSM token (own SOFTHSM2_CONF, found by label);
#   3. makes a CA, a server certificate for IP 127.0.0.1 and an Ed25519 client certificate, and
#      computes the client's identity (SHA-256 of its SubjectPublicKeyInfo, as KES);
#   4. starts two kesh instances on free loopback ports (port 0, read from the banner) with the
#      same config: that identity as admin, `keystore.pkcs11` on the token;
#   5. starts nginx (foreground, own prefix, pid and logs) on a free loopback port with a
#      `least_conn` upstream of the two instances;
#   6. runs a bounded workload through the balancer (parallel curl clients, one TLS connection per
#      request: create, generate, decrypt, describe), then checks that both instances served key
#      operations (each instance's audit log) and that keys move freely between instances
#      (create on one, use on the other, delete on one and see it gone on the other);
#   7. prints `scale-out: N passed, M failed` and exits non-zero on any failure.
# Every process it starts is stopped by the EXIT trap. Each wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
say() { echo "scale-out: $*"; }
die() {
  say "error: $*" >&2
  exit 1
}

# --- 1. tools -------------------------------------------------------------------------------
for tool in openssl curl softhsm2-util; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required (softhsm-tests/run installs softhsm2)"
done
nginx_bin=$(command -v nginx || true)
[ -z "$nginx_bin" ] && [ -x /usr/sbin/nginx ] && nginx_bin=/usr/sbin/nginx
stream_module=/usr/lib/nginx/modules/ngx_stream_module.so
if [ -z "$nginx_bin" ] || { [ ! -e "$stream_module" ] && ! "$nginx_bin" -V 2>&1 | grep -q -- '--with-stream\b'; }; then
  say "installing nginx and libnginx-mod-stream"
  export DEBIAN_FRONTEND=noninteractive
  # Debian starts services on install; a server on port 80 is not what a test wants. Docker
  # images already carry this policy file; elsewhere it exists only for the install.
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  install_ok=1
  { apt-get install -y -qq nginx-light libnginx-mod-stream >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq nginx-light libnginx-mod-stream >/dev/null; }; } || install_ok=
  [ -n "$own_policy" ] && rm -f "$policy"
  [ -n "$install_ok" ] || die "apt-get could not install nginx-light libnginx-mod-stream"
  nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
fi
[ -x "$nginx_bin" ] || die "nginx not found after install"

kesh_bin=${KESH_BIN:-${CARGO_TARGET_DIR:-target}/debug/kesh}
if [ -z "${KESH_BIN:-}" ]; then
  # Incremental: after `cargo test` this is a no-op.
  cargo build --quiet --bin kesh
fi
[ -x "$kesh_bin" ] || die "no kesh binary at $kesh_bin"

module=${KESH_SOFTHSM_MODULE:-}
if [ -z "$module" ]; then
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -e "$m" ] && module=$m && break
  done
fi
[ -n "$module" ] && [ -e "$module" ] || die "SoftHSMv2 module not found; set KESH_SOFTHSM_MODULE"

# --- cleanup --------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/kesh-scale-out.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "${KEEP:-}" = 1 ]; then
    say "kept $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 2. token -------------------------------------------------------------------------------
SOFTHSM2_CONF=$(softhsm-tests/softhsm-conf "$work")
export SOFTHSM2_CONF
label="kesh-scale-out-$$"
KESH_PIN=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
export KESH_PIN
softhsm2-util --init-token --free --label "$label" --so-pin "$KESH_PIN" --pin "$KESH_PIN" >/dev/null

# --- 3. certificates ------------------------------------------------------------------------
pki="$work/pki"
mkdir -p "$pki"
(
  cd "$pki"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -subj "/CN=kesh scale-out CA" -days 1 -out ca.crt 2>/dev/null
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key 2>/dev/null
  openssl req -new -key server.key -subj "/CN=kesh" -out server.csr 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" "subjectAltName=IP:127.0.0.1,DNS:localhost" >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
    -extfile server.ext -out server.crt 2>/dev/null
  openssl genpkey -algorithm ED25519 -out client.key 2>/dev/null
  openssl req -new -key client.key -subj "/CN=scale-out client" -out client.csr 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=clientAuth" >client.ext
  openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
    -extfile client.ext -out client.crt 2>/dev/null
)
identity=$(openssl pkey -in "$pki/client.key" -pubout -outform DER | sha256sum | cut -d' ' -f1)
[ ${#identity} -eq 64 ] || die "could not compute the client identity"

# --- 4. two kesh instances ------------------------------------------------------------------
cat >"$work/kesh.yaml" <<YAML
address: 127.0.0.1:0
admin:
  identity: $identity
tls:
  key: $pki/server.key
  cert: $pki/server.crt
keystore:
  pkcs11:
    module: $module
    token: $label
    pin: \${KESH_PIN}
    profile: softhsm
YAML

# Starts one instance; sets `addr` to its 127.0.0.1:PORT once the banner says it is up.
start_kesh() {
  local n=$1 out="$work/kesh$1.out" err="$work/kesh$1.err" i
  addr=
  NO_COLOR=1 "$kesh_bin" server --config "$work/kesh.yaml" --addr 127.0.0.1:0 >"$out" 2>"$err" &
  pids+=($!)
  for ((i = 0; i < 300; i++)); do
    if grep -q "Server is up and running" "$out" 2>/dev/null; then
      addr=$(sed -n 's/^API *· https:\/\///p' "$out" | head -n1)
      [ -n "$addr" ] || die "instance $n: no address in its banner"
      return 0
    fi
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$err" >&2; die "instance $n exited at start"; }
    sleep 0.1
  done
  die "instance $n did not come up within 30 s"
}
# Started one after the other: both open the same token.
start_kesh 1
kesh1=$addr
start_kesh 2
kesh2=$addr
say "kesh instances on $kesh1 and $kesh2, token '$label'"

# --- 5. nginx -------------------------------------------------------------------------------
ngx="$work/nginx"
mkdir -p "$ngx/logs"
load=""
[ -e "$stream_module" ] && load="load_module $stream_module;"
lb_port=
for ((try = 0; try < 20; try++)); do
  port=$((20000 + RANDOM % 40000))
  ss -Htln "sport = :$port" 2>/dev/null | grep -q . && continue
  cat >"$ngx/nginx.conf" <<NGINX
$load
daemon off;
master_process on;
worker_processes 1;
pid $ngx/nginx.pid;
error_log $ngx/logs/error.log warn;
events { worker_connections 512; }
stream {
    log_format upstreams '\$remote_addr \$upstream_addr \$status \$session_time';
    access_log $ngx/logs/stream.log upstreams;
    upstream kesh {
        least_conn;
        server $kesh1 max_fails=3 fail_timeout=10s;
        server $kesh2 max_fails=3 fail_timeout=10s;
    }
    server {
        listen 127.0.0.1:$port;
        proxy_pass kesh;
        proxy_connect_timeout 2s;
        proxy_timeout 60s;
    }
}
NGINX
  "$nginx_bin" -p "$ngx" -c "$ngx/nginx.conf" -e "$ngx/logs/error.log" &
  nginx_pid=$!
  pids+=("$nginx_pid")
  for ((i = 0; i < 50; i++)); do
    if curl -s -o /dev/null --max-time 2 --cacert "$pki/ca.crt" --cert "$pki/client.crt" \
      --key "$pki/client.key" "https://127.0.0.1:$port/v1/ready"; then
      lb_port=$port
      break
    fi
    kill -0 "$nginx_pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$lb_port" ] && break
  kill -TERM "$nginx_pid" 2>/dev/null || true
  wait "$nginx_pid" 2>/dev/null || true
done
[ -n "$lb_port" ] || { cat "$ngx/logs/error.log" >&2 || true; die "nginx did not start"; }
lb="127.0.0.1:$lb_port"
say "nginx (stream, least_conn, TLS passthrough) on $lb"

# --- 6. workload ----------------------------------------------------------------------------
# One request, one TLS connection. Prints the body; returns non-zero unless the status matches.
call() {
  local want=$1 method=$2 addr=$3 path=$4 body=${5:-} code out
  out=$(mktemp "$work/body.XXXXXX")
  code=$(curl -s -o "$out" -w '%{http_code}' --max-time 10 -X "$method" \
    --cacert "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key" \
    ${body:+--data "$body"} "https://$addr$path") || code="curl-error-$?"
  cat "$out"
  rm -f "$out"
  [ "$code" = "$want" ] || {
    echo "$method $path via $addr: HTTP $code, want $want" >>"${FAILS:-$work/failures}"
    return 1
  }
}
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p"; }

# One request through the balancer on a key created a moment ago. It may reach the other
# instance than the create did, which must know the key at once (docs/scale-out.md). A 404 is
# retried for up to 2 s so the rest of the run still says something, but each one is counted
# in late.<worker> and fails the run.
fresh() {
  local w=$1 want=$2 method=$3 path=$4 body=${5:-} i code
  for ((i = 0; i < 20; i++)); do
    code=$(curl -s -o "$work/fresh.$w" -w '%{http_code}' --max-time 10 -X "$method" \
      --cacert "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key" \
      ${body:+--data "$body"} "https://$lb$path") || code="curl-error-$?"
    [ "$code" = 404 ] && [ "$want" != 404 ] || break
    echo "$path" >>"$work/late.$w"
    sleep 0.1
  done
  cat "$work/fresh.$w"
  [ "$code" = "$want" ] || {
    echo "$method $path via $lb: HTTP $code, want $want" >>"$work/failures.$w"
    return 1
  }
}

# A worker: create a key, then generate a data key, decrypt it and describe the key, each
# request on its own TLS connection through the balancer. One line per step to its tally file.
worker() {
  local w=$1 rounds=$2 r name out ct pt back ctx
  ctx=$(printf '{"bucket":"bucket/object-%s"}' "$w" | base64 | tr -d '\n')
  for ((r = 0; r < rounds; r++)); do
    name="scale-$w-$r"
    if FAILS="$work/failures.$w" call 200 POST "$lb" "/v1/key/create/$name" >/dev/null; then
      echo pass
    else
      echo fail
    fi
    if out=$(fresh "$w" 200 POST "/v1/key/generate/$name" "{\"context\":\"$ctx\"}"); then
      echo pass
      pt=$(field plaintext <<<"$out")
      ct=$(field ciphertext <<<"$out")
      if back=$(fresh "$w" 200 POST "/v1/key/decrypt/$name" \
        "{\"ciphertext\":\"$ct\",\"context\":\"$ctx\"}") && [ "$(field plaintext <<<"$back")" = "$pt" ]; then
        echo pass
      else
        echo "decrypt of $name through the balancer did not return the data key" >>"$work/failures.$w"
        echo fail
      fi
    else
      echo fail
    fi
    if fresh "$w" 200 GET "/v1/key/describe/$name" | grep -q "\"name\":\"$name\""; then
      echo pass
    else
      echo fail
    fi
  done >"$work/tally.$w"
}
workers=4
rounds=6
wpids=()
for ((w = 0; w < workers; w++)); do
  worker "$w" "$rounds" &
  wpids+=($!)
done
for pid in "${wpids[@]}"; do wait "$pid" || true; done
passed=$(cat "$work"/tally.* | grep -c '^pass$' || true)
failed=$(cat "$work"/tally.* | grep -c '^fail$' || true)
expected=$((workers * rounds * 4))
if [ $((passed + failed)) -ne "$expected" ]; then
  echo "workload ran $((passed + failed)) of $expected steps" >>"$work/failures"
  failed=$((failed + expected - passed - failed))
fi

check() {
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

# Both instances served key operations: count audited key requests in each one's audit trail
# (stdout, one slog-style line per request).
audited() { grep -c 'level=INFO msg=.* req\.path="\?/v1/key/' "$1" || true; }
served1=$(audited "$work/kesh1.out")
served2=$(audited "$work/kesh2.out")
both_served() {
  [ "$served1" -gt 0 ] && [ "$served2" -gt 0 ] || {
    echo "least_conn sent every key request to one instance ($served1 / $served2)" >>"$work/failures"
    return 1
  }
}
check both_served

# Keys move between instances: create on one, use on the other, in both directions.
crosses() {
  local from=$1 to=$2 name=$3 out ct
  call 200 POST "$from" "/v1/key/create/$name" >/dev/null || return 1
  out=$(call 200 POST "$to" "/v1/key/generate/$name" '{"context":""}') || return 1
  ct=$(field ciphertext <<<"$out")
  [ "$(call 200 POST "$from" "/v1/key/decrypt/$name" "{\"ciphertext\":\"$ct\"}" | field plaintext)" \
    = "$(field plaintext <<<"$out")" ] || {
    echo "$name: data key from $to does not decrypt on $from" >>"$work/failures"
    return 1
  }
  call 200 GET "$to" "/v1/key/describe/$name" >/dev/null
}
check crosses "$kesh1" "$kesh2" cross-1-to-2
check crosses "$kesh2" "$kesh1" cross-2-to-1

# A key created through the balancer is usable on each instance directly.
direct_use() {
  call 200 POST "$1" /v1/key/generate/scale-0-0 '{"context":""}' >/dev/null
}
check direct_use "$kesh1"
check direct_use "$kesh2"

# A delete on one instance is seen by the other: describe at once (it reads the token object),
# seals within 1 s (they use a session copy of the key, rechecked every second on SoftHSM).
delete_seen() {
  local name=delete-seen i code
  call 200 POST "$kesh1" "/v1/key/create/$name" >/dev/null || return 1
  call 200 GET "$kesh2" "/v1/key/describe/$name" >/dev/null || return 1
  call 200 POST "$kesh2" "/v1/key/generate/$name" '{"context":""}' >/dev/null || return 1
  call 200 DELETE "$kesh1" "/v1/key/delete/$name" >/dev/null || return 1
  # Seals first: a describe would drop the copy at once and hide the recheck.
  for ((i = 0; i < 15; i++)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X POST --cacert "$pki/ca.crt" \
      --cert "$pki/client.crt" --key "$pki/client.key" --data '{"context":""}' \
      "https://$kesh2/v1/key/generate/$name") || code=curl-error
    [ "$code" = 200 ] || break
    sleep 0.1
  done
  say "a seal on the other instance saw the delete after $i polls of 0.1 s"
  [ "$code" = 404 ] || {
    echo "$name: generate on $kesh2 answered $code 1.5 s after the delete on $kesh1" >>"$work/failures"
    return 1
  }
  call 404 GET "$kesh2" "/v1/key/describe/$name" >/dev/null
}
check delete_seen

# One name created on both instances at the same moment: exactly one create wins (200), the
# other answers 400 `key already exists`, and the key then works on both at once.
concurrent_create() {
  local name=race-$1 codes
  codes=$(
    for addr in "$kesh1" "$kesh2"; do
      curl -s -o /dev/null -w '%{http_code}\n' --max-time 20 -X POST --cacert "$pki/ca.crt" \
        --cert "$pki/client.crt" --key "$pki/client.key" "https://$addr/v1/key/create/$name" &
    done
    wait
  )
  codes=$(sort <<<"$codes" | tr '\n' ' ')
  say "concurrent create of one name on both instances answered: $codes"
  [ "$codes" = "200 400 " ] || {
    echo "concurrent create of $name answered $codes: want one 200 and one 400" >>"$work/failures"
    return 1
  }
  local addr
  for addr in "$kesh1" "$kesh2"; do
    call 200 POST "$addr" "/v1/key/generate/$name" '{"context":""}' >/dev/null || return 1
  done
}
for round in 1 2 3 4 5; do
  check concurrent_create "$round"
done

# Each instance logged the profile defaults it applied.
profile_logged() {
  local n
  for n in 1 2; do
    grep 'pkcs11 keystore ready' "$work/kesh$n.err" | grep 'profile="\?softhsm' | grep -q 'write_lock=/' || {
      echo "instance $n did not log 'pkcs11 keystore ready ... profile=softhsm ... write_lock=<path>'" >>"$work/failures"
      return 1
    }
  done
}
check profile_logged

# Both instances list every key made through the balancer. A listing serves the instance's index,
# which follows the other instance's creates within a second (the change marker, docs/scale-out.md):
# poll every 0.1 s, bounded at 1 s.
lists_all() {
  local addr=$1 body w r i missing
  for ((i = 0; i <= 10; i++)); do
    body=$(call 200 GET "$addr" '/v1/key/list/scale-*') || return 1
    missing=
    for ((w = 0; w < workers; w++)); do
      for ((r = 0; r < rounds; r++)); do
        grep -q "\"scale-$w-$r\"" <<<"$body" || missing="$missing scale-$w-$r"
      done
    done
    if [ -z "$missing" ]; then
      [ "$i" -gt 0 ] && say "listing on $addr complete after $i polls of 0.1 s"
      return 0
    fi
    sleep 0.1
  done
  echo "list on $addr still misses:$missing" >>"$work/failures"
  return 1
}
check lists_all "$kesh1"
check lists_all "$kesh2"

# --- 7. summary -----------------------------------------------------------------------------
lb_conns=$(wc -l <"$ngx/logs/stream.log" 2>/dev/null || echo 0)
cat "$work"/failures.* >>"$work/failures" 2>/dev/null || true
if [ -s "$work/failures" ]; then
  sed 's/^/scale-out: failure: /' "$work/failures" >&2
  # The instances' own account of what failed (their error log), for a run nobody can rerun.
  for n in 1 2; do
    grep -E ' (ERROR|WARN) ' "$work/kesh$n.err" 2>/dev/null | tail -n 20 | sed "s/^/scale-out: instance $n: /" >&2 || true
  done
fi
late=$( (cat "$work"/late.* 2>/dev/null || true) | wc -l)
say "$lb_conns connections through nginx; key requests audited: instance 1 $served1, instance 2 $served2"
say "$late requests retried after a 404 on a key created moments before on the other instance"
if [ "$late" -gt 0 ]; then
  say "failure: keys created on one instance were not known at once on the other" >&2
  failed=$((failed + 1))
fi
say "finished in $(($(date +%s) - started)) s"
say "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
