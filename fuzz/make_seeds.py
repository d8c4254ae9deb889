#!/usr/bin/env python3
"""Writes fuzz/seeds/TARGET/ from the repository's captures and test batteries.

Run from anywhere; the seeds are committed, so this is only needed to regenerate them. Frames are
signed with the fuzz targets' key and dated at their NOW, so they are accepted as they are.
"""
import hashlib
import hmac
import pathlib
import struct

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CAPTURES = ROOT / "tests" / "data" / "vllm-0.32.0-cpu"
KEY = b"0123456789abcdef-fuzz"
NOW = 1_800_000_000_000


def seed(target, name, data):
    d = HERE / "seeds" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def frame(worker, pool, boot, seq, sent, metrics, models=(b"m",), v6=False, key_id=1, adapters=None):
    """A signed frame: version 3 with an adapter list when `adapters` is given, else version 2."""
    def s(b):
        return bytes([len(b)]) + b
    version = 2 if adapters is None else 3
    out = b"GH" + bytes([version]) + struct.pack(">HQQQ", key_id, boot, seq, sent) + s(worker) + s(pool)
    out += (bytes([6]) + bytes(15) + b"\x01") if v6 else (bytes([4]) + bytes([10, 0, 0, 1]))
    out += struct.pack(">H", 8000) + bytes([len(models)]) + b"".join(s(m) for m in models)
    if adapters is not None:
        out += bytes([len(adapters)]) + b"".join(s(a) for a in adapters)
    present = 0
    for i, v in enumerate(metrics):
        if v is not None:
            present |= 1 << i
    out += struct.pack(">H", present) + b"".join(struct.pack(">d", v or 0.0) for v in metrics)
    return out + hmac.new(KEY, out, hashlib.sha256).digest()


# What the sidecar's mapping reads (sidecar/src/scrape.rs, WANTED).
WANTED = (b"num_requests_running", b"num_requests_waiting", b"kv_cache_usage_perc", b"gpu_cache_usage_perc",
          b"time_to_first_token_seconds_sum", b"time_to_first_token_seconds_count", b"prompt_tokens_total",
          b"generation_tokens_total", b"num_preemptions_total", b"iteration_tokens_total_count")


def metrics_excerpt(page):
    """A /metrics page cut to about 2 KB: every sample the mapping reads with its HELP and TYPE
    lines, and, for the filter to skip, the page's first lines (python_gc), a few other vLLM
    TYPE lines (the filter keeps every one), histogram buckets and a sample of another vLLM name."""
    lines = page.split(b"\n")
    names = {b"vllm:" + w for w in WANTED}
    names |= {n.removesuffix(b"_sum").removesuffix(b"_count") for n in names}

    def name_of(line):
        rest = line[7:] if line.startswith((b"# HELP ", b"# TYPE ")) else line
        return rest.split(b"{")[0].split(b" ")[0]

    keep, other_types, buckets = set(range(6)), 0, 0
    for i, line in enumerate(lines):
        n = name_of(line)
        if n in names:
            keep.add(i)
        elif line.startswith(b"# TYPE vllm:") and other_types < 4:
            keep.add(i)
            other_types += 1
        elif n.startswith(b"vllm:time_to_first_token_seconds_bucket") and buckets < 3:
            keep.add(i)
            buckets += 1
        elif n == b"vllm:num_requests_swapped" or n == b"vllm:engine_sleep_state":
            keep.add(i)
    return b"\n".join(lines[i] for i in sorted(keep)) + b"\n"


def dns_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def query(qid, name, qtype, edns=None, opcode=0, qclass=1):
    flags = (opcode << 11) | 0x0100
    q = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0) + dns_name(name) + struct.pack(">HH", qtype, qclass)
    if edns:
        q += b"\x00" + struct.pack(">HHIH", 41, edns, 0, 0)
    return q


def main():
    busy = [2.0, 1.0, 0.25, 1.5, 10.0, 500.0, 900.0, 0.0, 120.0]
    frames = {
        "v4-busy": frame(b"w1", b"pool-a", 7, 1, NOW, busy),
        "v6-idle": frame(b"w2", b"pool-b", 1, 9, NOW + 100, [0.0, 0.0] + [None] * 7, v6=True),
        "no-metrics": frame(b"w3", b"p", 3, 1, NOW - 100, [None] * 9, models=()),
        "eight-models": frame(b"w" * 64, b"p" * 64, 1, 1, NOW, busy, models=tuple(b"m%d" % i for i in range(8))),
        "key-2": frame(b"w4", b"p", 1, 1, NOW, busy, key_id=2),
        "v3-adapters": frame(b"w5", b"pool-a", 2, 1, NOW, busy, models=(b"tiny", b"sql"), adapters=(b"sql", b"chat-lora")),
        "v3-no-adapters": frame(b"w6", b"pool-b", 2, 1, NOW, busy, adapters=()),
        "v3-full": frame(b"w" * 64, b"p" * 64, 1, 1, NOW, busy, models=(b"m" * 64,), adapters=tuple(b"%d" % i + b"a" * 60 for i in range(3))),
    }
    for name, f in frames.items():
        seed("frame_decode", name, f)
    seed("frame_decode", "garbage", b"\x00\x01garbage")
    for i, name in enumerate(["small", "medium"]):
        seed("frame_mutate", name, bytes(range(i * 40, i * 40 + 120)))

    for f in sorted(CAPTURES.glob("*.txt")):
        data = f.read_bytes()
        if f.name.startswith("metrics-"):
            # Not whole pages (~50 KB, a few hundred executions a second): the lines the mapping
            # reads, with some of what the sidecar's line filter must skip.
            data = metrics_excerpt(data)
            http = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(data) + data
            chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(
                b"%x\r\n%s\r\n" % (len(data[i:i + 700]), data[i:i + 700]) for i in range(0, len(data), 700)) + b"0\r\n\r\n"
            seed("sidecar_metrics", "body-" + f.name, b"\x01" + data)
            seed("sidecar_metrics", "http-" + f.name, b"\x00" + http)
            seed("sidecar_metrics", "filtered-" + f.name, b"\x02" + chunked)
            # Mode 3: the same response in reads of 1 + (mode >> 2) bytes (here 13).
            seed("sidecar_metrics", "reads-" + f.name, bytes([3 | (12 << 2)]) + http)
        else:
            body = data.split(b"\r\n\r\n", 1)[-1]
            seed("sse_output", f.name, b"\x80" + body)
            seed("attempt", f.name, b"\x00\x10\x00" + body)
            seed("request_scan", f.name, body[:2048])
    # Data parallel: sums across engines, one of them at the edge of f64 (saturates).
    engines = b"".join(b'vllm:%s{engine="%d",model_name="m%d"} %s\n' % (n, e, e, v) for e, v in ((0, b"1e308"), (1, b"1e308"))
                       for n in (b"num_requests_running", b"kv_cache_usage_perc", b"prompt_tokens_total"))
    seed("sidecar_metrics", "two-engines", b"\x01# TYPE vllm:num_requests_running gauge\n" + engines)
    for name, body in {
        "chat.json": b'{"messages":[{"role":"user","content":"hi \\"there\\""}],"model":"m","stream":true}',
        "model-first.json": b'{"model":"Qwen/Qwen3-0.6B","stream":false,"max_tokens":8}',
        "escaped.json": b'{"\\u006dodel":"m\\u00e9","str\\u0065am":true}',
        "nested.json": b'{"tools":[{"a":{"b":[1,2,{"c":null}]}}],"model":123,"stream":"true"}',
    }.items():
        seed("request_scan", name, b"\x00" + body)
    form = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF....\r\n--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--XyZ\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n--XyZ--\r\n'
    seed("request_scan", "multipart", b"\x01\x25multipart/form-data; boundary=XyZ" + form)

    qid = 0x1234
    names = ["api.gpuha.test.", "prio.gpuha.test.", "big.gpuha.test.", "chat.gpuha.test.", "away.gpuha.test.", "txt.gpuha.test.",
             "gpuha.test.", "nope.gpuha.test.", "x.a.b.deep.gpuha.test.", "b.deep.gpuha.test.", "ns1.gpuha.test.", "elsewhere.example.", "API.GpUhA.TeSt."]
    types = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "MX": 15, "TXT": 16, "AAAA": 28, "ANY": 255, "AXFR": 252, "IXFR": 251}
    for i, n in enumerate(names):
        for j, (t, code) in enumerate(types.items()):
            # One transport, source and EDNS size per question, rotating (the fuzzer mixes them).
            how, edns = (i + j) % 4, (None, 1232, 4096)[(i + j) % 3]
            seed("dns_respond", f"{n}{t}", bytes([how]) + query(qid, n, code, edns))
    seed("dns_respond", "notify", b"\x00" + query(qid, "gpuha.test.", 6, opcode=4))
    seed("dns_respond", "chaos", b"\x00" + query(qid, "version.bind.", 16, qclass=3))
    seed("dns_respond", "compressed-pointer", b"\x00" + bytes.fromhex("123401000001000000000000c00200010001"))
    seed("dns_respond", "edns-v1", b"\x00" + query(qid, "api.gpuha.test.", 1, 1232)[:-11] + b"\x00" + struct.pack(">HHIH", 41, 1232, 0x00010000, 0))

    for f in ["dnsd.toml", "loopback.toml"]:
        seed("config_parse", "dnsd-" + f, b"\x00" + (ROOT / "deploy" / "dnsd" / f).read_bytes())
    for name, cfg in {
        "picker": b'{"role":"picker","fleet_cluster":"gpuha_fleet","fleet_authority":"dnsd","max_body_bytes":33554432}',
        "guard": b'{"role":"guard"}',
        "failwhale": b'{"role":"failwhale","max_body_bytes":1048576}',
        "picker-full": b'{"role":"picker","fleet_cluster":"c","no_worker":"fail_open","pick":{},"breaker":{}}',
    }.items():
        seed("config_parse", "filter-" + name, b"\x01" + cfg)

    # fleet_wire builds its views from the input (arbitrary): any bytes will do as seeds.
    seed("fleet_wire", "small", bytes(range(0, 200)))
    seed("fleet_wire", "magic", b"GHFV\x01\x00\x00\x00" + bytes(16) + bytes(range(64)))


if __name__ == "__main__":
    main()
