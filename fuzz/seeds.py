#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/: a few valid inputs
per target, in the input layout each target documents (most start with two
split-point bytes). Run from anywhere: `python3 fuzz/seeds.py`. The audit log
seeds are computed the way warden writes its log (compact JSON body, SHA-256
of it, then the `hash` member appended)."""

import hashlib
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def split(at):
    return struct.pack(">H", at)


# --- PostgreSQL ---------------------------------------------------------------

def startup(params, minor=0):
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params) + b"\0"
    return struct.pack(">II", 8 + len(body), (3 << 16) | minor) + body


def msg(tag, body):
    return tag + struct.pack(">I", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


psql = startup([("user", "app"), ("database", "orders"), ("application_name", "psql"),
                ("client_encoding", "UTF8")])
put("pg_startup", "startup-psql", split(7) + psql)
put("pg_startup", "startup-3.2", split(3) + startup([("user", "app"), ("_pq_.x", "1")], minor=2))
put("pg_startup", "ssl-request", split(5) + struct.pack(">II", 8, 80877103))
put("pg_startup", "gssenc-request", split(5) + struct.pack(">II", 8, 80877104))
put("pg_startup", "cancel-4", split(9) + struct.pack(">IIi", 16, 80877102, 4242) + b"\x01\x02\x03\x04")
put("pg_startup", "cancel-32", split(9) + struct.pack(">IIi", 44, 80877102, 4242) + bytes(range(32)))
put("pg_startup", "startup-then-query", split(30) + psql + msg(b"Q", cstr("select 1")))

simple = msg(b"Q", cstr("select 1")) + msg(b"X", b"")
extended = (msg(b"P", b"\0" + cstr("select $1") + b"\0\0")
            + msg(b"B", b"\0\0\0\0\0\x01\0\0\0\x01" + b"7" + b"\0\0")
            + msg(b"D", b"P\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S", b""))
copy = msg(b"Q", cstr("copy t from stdin")) + msg(b"d", b"1\tone\n") + msg(b"c", b"")
put("pg_frontend", "simple-query", split(4) + simple)
put("pg_frontend", "extended-batch", split(17) + extended + msg(b"X", b""))
put("pg_frontend", "copy-in", split(12) + copy)
put("pg_frontend", "function-call", split(2) + msg(b"F", b"\0\0\x04\xd2\0\0\0\0\0\0") + msg(b"X", b""))

auth_sasl = msg(b"R", struct.pack(">i", 10) + cstr("SCRAM-SHA-256-PLUS") + cstr("SCRAM-SHA-256") + b"\0")
login = (msg(b"R", struct.pack(">i", 0))
         + msg(b"S", cstr("server_version") + cstr("18.1"))
         + msg(b"S", cstr("client_encoding") + cstr("UTF8"))
         + msg(b"K", struct.pack(">i", 777) + b"\xaa\xbb\xcc\xdd")
         + msg(b"Z", b"I"))
error = msg(b"E", b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"app\"\0\0")
put("pg_backend", "sasl-offer", split(3) + auth_sasl)
put("pg_backend", "sasl-continue", split(9) + msg(b"R", struct.pack(">i", 11) + b"r=abc,s=c2FsdA==,i=4096"))
put("pg_backend", "sasl-final", split(9) + msg(b"R", struct.pack(">i", 12) + b"v=c2lnbmF0dXJl"))
put("pg_backend", "md5", split(1) + msg(b"R", struct.pack(">i", 5) + b"salt"))
put("pg_backend", "login-ok", split(20) + login)
put("pg_backend", "error", split(6) + error)
put("pg_backend", "notice-negotiate", split(6) + msg(b"N", b"SWARNING\0C01000\0Mhm\0\0")
    + msg(b"v", struct.pack(">ii", 0, 1) + cstr("_pq_.x")))
put("pg_backend", "rows", split(11) + msg(b"T", b"\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0")
    + msg(b"D", b"\0\x01\0\0\0\x011") + msg(b"C", cstr("SELECT 1")) + msg(b"Z", b"T"))

# --- SCRAM (first byte: channel binding mode; then server-first NUL server-final)

for mode, name in [(0, "none"), (1, "supported-not-used"), (2, "plus")]:
    put("scram_server", f"exchange-{name}",
        bytes([mode]) + b"r=%N3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096\0"
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
put("scram_server", "server-error", b"\0r=%Nabc,s=c2FsdA==,i=4096\0e=invalid-proof")
put("scram_server", "extension", b"\0m=ext,r=%Nabc,s=c2FsdA==,i=4096")
put("scram_server", "too-many-iterations", b"\0r=%Nabc,s=c2FsdA==,i=99999999")

# --- HTTP ---------------------------------------------------------------------

get = b"GET /v1/items?x=1 HTTP/1.1\r\nHost: api.internal\r\nAccept: */*\r\n\r\n"
post = (b"POST /v1/items HTTP/1.1\r\nHost: api.internal\r\nContent-Type: application/json\r\n"
        b"Content-Length: 13\r\n\r\n{\"name\":\"x\"}\n")
chunked = (b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n")
put("http_gate", "get-keepalive", split(20) + get + get)
put("http_gate", "post-length", split(60) + post)
put("http_gate", "post-chunked", split(80) + chunked)
put("http_gate", "websocket-upgrade", split(40) + b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\n\r\n\x81\x05hello")
put("http_gate", "connect", split(10) + b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\nraw")
put("http_gate", "chunked-body", split(7) + b"5\r\nhello\r\n0\r\n\r\n")
put("http_gate", "smuggling", split(30) + b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")

# --- RESP ---------------------------------------------------------------------

def command(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out

put("resp", "set-get", split(9) + command(b"SET", b"key", b"value") + command(b"GET", b"key"))
put("resp", "auth-hello", split(5) + command(b"AUTH", b"app", b"ignored") + command(b"HELLO", b"3"))
put("resp", "inline", split(3) + b"PING\r\nset a 1\n")
# redis_spliced: the client's bytes after a kernel-relay splice.
put("redis_spliced", "commands", split(20) + command(b"SET", b"k", b"v") + command(b"auth", b"pw") + command(b"GET", b"k"))
put("redis_spliced", "hello-reset", split(7) + command(b"HELLO", b"3", b"AUTH", b"u", b"p", b"SETNAME", b"n") + b"PING\r\n" + command(b"RESET"))
put("redis_spliced", "lines", split(4) + b"SET k v\nGET k\nINCR n")
put("resp", "replies-resp2", split(4) + b"+OK\r\n-ERR no\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n$1\r\na\r\n*-1\r\n")
put("resp", "replies-resp3", split(8) + b"%1\r\n+a\r\n:1\r\n|1\r\n+ttl\r\n:3\r\n~2\r\n#t\r\n,1.5\r\n"
    b">2\r\n+message\r\n=8\r\ntxt:hi!!\r\n_\r\n(123\r\n!3\r\nerr\r\n")
put("resp", "nested", split(2) + b"*1\r\n*1\r\n*1\r\n*2\r\n:1\r\n:2\r\n")

# --- config -------------------------------------------------------------------

for name in ["quickstart.toml", "full.toml"]:
    d = os.path.join(CORPUS, "config")
    os.makedirs(d, exist_ok=True)
    shutil.copy(os.path.join(HERE, "..", "examples", name), os.path.join(d, name))
put("config", "typo", b'[store]\nbakend = "sqlite"\n[[route]]\nname = "db"\nkind = "postgress"\n')

# --- audit log (log bytes, then NUL and the head anchor) ------------------------

GENESIS = "0" * 64


def record(seq, prev, action, reason, decision="allow", actor=None, target=None):
    body = {
        "seq": seq,
        "time": "2026-01-01T00:00:%02d.000000Z" % seq,
        "actor": actor or {"kind": "workload", "uid": 1000, "pid": 4242 + seq,
                           "exe": "/usr/bin/psql", "workload": "orders-api"},
        "action": action,
        "target": target or {"route": "orders-db"},
        "decision": decision,
        "reason": reason,
        "prev": prev,
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    digest = hashlib.sha256(raw).hexdigest()
    return raw[:-1] + b',"hash":"' + digest.encode() + b'"}', digest


def chain(events):
    lines, prev = [], GENESIS
    for seq, (action, reason, decision) in enumerate(events, start=1):
        line, prev = record(seq, prev, action, reason, decision)
        lines.append(line)
    return b"".join(line + b"\n" for line in lines), prev, len(lines)


log, head, n = chain([("session.start", "allowed", "allow"), ("session.end", "client closed", "allow"),
                      ("session.deny", "workload not on the route's allow list", "deny")])
anchor = json.dumps({"seq": n, "hash": head}, separators=(",", ":")).encode()
put("audit_verify", "chain-with-anchor", log + b"\0" + anchor)
put("audit_verify", "chain-no-anchor", log)
put("audit_verify", "tampered", log.replace(b"client closed", b"client closeD") + b"\0" + anchor)
put("audit_verify", "truncated", log[: len(log) // 2])
put("audit_verify", "empty", b"")


# --- MySQL handshake (mysql_packet: a selector byte, then the payload) ------

def mysql_greeting(plugin=b"caching_sha2_password"):
    caps = 0x0001 | 0x0008 | 0x0200 | 0x8000 | 0x80000 | 0x100000 | 0x200000
    scramble = bytes(range(1, 21))
    return (b"\x0a" + b"8.0.36\0" + struct.pack("<I", 7) + scramble[:8] + b"\0"
            + struct.pack("<H", caps & 0xFFFF) + b"\x21" + struct.pack("<H", 2)
            + struct.pack("<H", caps >> 16) + bytes([21]) + b"\0" * 10
            + scramble[8:] + b"\0" + plugin + b"\0")


def mysql_response(db=b"app", plugin=b"mysql_native_password"):
    caps = 0x0001 | 0x0008 | 0x0200 | 0x8000 | 0x80000 | 0x100000 | 0x200000
    attrs = b"\x04_pid\x041234\x07_client\x08libmysql"
    return (struct.pack("<IIB", caps, 1 << 24, 0x21) + b"\0" * 23 + b"app\0"
            + bytes([20]) + bytes(range(20)) + db + b"\0" + plugin + b"\0"
            + bytes([len(attrs)]) + attrs)


put("mysql_packet", "greeting", b"\x00" + mysql_greeting())
put("mysql_packet", "greeting-mariadb", b"\x00" + mysql_greeting(b"client_ed25519"))
put("mysql_packet", "response", b"\x01" + mysql_response())
put("mysql_packet", "ssl-request", b"\x01" + struct.pack("<IIB", 0x0200 | 0x0800 | 0x8000, 1 << 24, 0x21) + b"\0" * 23)
put("mysql_packet", "err", b"\x02" + b"\xff\x15\x04#28000Access denied for user 'app'")
put("mysql_packet", "lenenc", b"\x03" + b"\x03abc\xfc\x02\x00hi\xfd\x01\x00\x00z\xfb")

# --- PostgreSQL pool state check (pg_session_state: SQL text) ----------------

for name, sql in [
    ("select", b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"),
    ("multi", b"BEGIN; SELECT 1; COMMIT"),
    ("quoted", b"SELECT 'a;b', \"x\"\"y\", $$z$$ /* c */ -- d\n"),
    ("show", b"SHOW search_path"),
    ("set", b"SET application_name = 'x'"),
    ("function", b"SELECT set_config('a.b', '1', false)"),
    ("into", b"SELECT 1 INTO TEMP t"),
]:
    put("pg_session_state", name, sql)

# --- MySQL pool state check (mysql_session_state: SQL text) -------------------

for name, sql in [
    ("select", b"SELECT c FROM sbtest1 WHERE id = 5012"),
    ("client-init", b"select @@version_comment limit 1"),
    ("builtins", b"SELECT COUNT(*), CONCAT(a, 'x'), CAST(b AS CHAR(10)) FROM t WHERE c IN (1, 2) FOR UPDATE"),
    ("quoted", b"SELECT 'a;b', \"x\"\"y\", `q``r` /* c */ # d\n-- e\n"),
    ("show", b"SHOW VARIABLES LIKE 'max%'"),
    ("set", b"SET NAMES utf8mb4"),
    ("function", b"SELECT GET_LOCK('a', 0)"),
    ("into", b"SELECT 1 INTO @a"),
    ("assign", b"SELECT @a := 1"),
    ("executable-comment", b"SELECT 1 /*!50000 , @a := 2 */"),
    ("backslash", b"SELECT 'a\\', SLEEP(1) -- '"),
]:
    put("mysql_session_state", name, sql)

# --- Workload API :authority fix-up (workload_authority: split, then bytes read
# as two HPACK blocks cut at the split, and as raw client bytes after the preface)

def hpack_int(first, prefix, value):
    top = (1 << prefix) - 1
    if value < top:
        return bytes([first | value])
    out, value = bytearray([first | top]), value - top
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])


def hpack_str(s):
    return hpack_int(0, 7, len(s)) + s


def literal(name, value, kind=0x40):
    # kind 0x40: incremental indexing, 0x00: without indexing, 0x10: never indexed
    prefix = 6 if kind == 0x40 else 4
    if isinstance(name, int):
        return hpack_int(kind, prefix, name) + hpack_str(value)
    return bytes([kind]) + hpack_str(name) + hpack_str(value)


def h2frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


# What gRPC C-core (py-spiffe) sends: the socket path as :authority.
grpc_core = (b"\x83\x86" + literal(1, b"tmp%2Fagent.sock")
             + literal(4, b"/SpiffeWorkloadAPI/FetchX509SVID")
             + literal(31, b"application/grpc") + literal(b"te", b"trailers")
             + literal(b"workload.spiffe.io", b"true"))
# The next request on the connection, from the dynamic table.
grpc_core_again = b"\x83\x86" + bytes([0x80 | 66, 0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62])
put("workload_authority", "grpc-core-two-requests", split(len(grpc_core)) + grpc_core + grpc_core_again)
go = (b"\x83\x86" + literal(1, b"localhost", 0x00) + literal(4, b"/SpiffeWorkloadAPI/FetchJWTSVID", 0x00)
      + literal(b"workload.spiffe.io", b"true", 0x10))
put("workload_authority", "go-valid-authority", split(len(go)) + go + b"\x3f\xe1\x1f" + go)
# RFC 7541 C.4.1 (Huffman-coded :authority www.example.com), then a table size update.
rfc = bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff")
put("workload_authority", "rfc7541-huffman", split(len(rfc)) + rfc + b"\x20" + b"\xbe")
# Raw client bytes: SETTINGS, a HEADERS + CONTINUATION with the socket path, DATA.
frames = (h2frame(4, 0, 0, b"\x00\x02\x00\x00\x00\x00")
          + h2frame(1, 0x1, 1, grpc_core[:20]) + h2frame(9, 0x4, 1, grpc_core[20:])
          + h2frame(0, 0x1, 1, b"\x00\x00\x00\x00\x00"))
put("workload_authority", "frames", split(7) + frames)

# --- Store rows (store_rows: split, the secret before it, then 9-byte edits:
# kind (bit 7: ciphertext, else wrapped key), row, two position bytes, data)

put("store_rows", "untouched", split(16) + b"postgres-pass-01")
put("store_rows", "flip-ciphertext", split(8) + b"hunter2!" + bytes([0x80, 1, 0, 40, 0, 0, 0, 0, 0]))
put("store_rows", "swap-wrapped-key", split(8) + b"hunter2!" + bytes([4, 0, 1, 0, 0, 0, 0, 0, 0]))
put("store_rows", "renumber", split(8) + b"hunter2!" + bytes([5, 1, 0, 1, 0, 0, 0, 0, 0]))
put("store_rows", "truncate-and-rename", split(4) + b"abcd" + bytes([0x81, 2, 0, 10, 0, 0, 0, 0, 0])
    + bytes([7, 2, 0, 0, 0, 0, 0, 0, 0]))
put("store_rows", "other-master-key", split(4) + b"abcd" + bytes([6, 0, 0, 0]) + b"0123456789abcdef")
