"""Orchestrates the benchmark (bench/run): seeds queues, runs the release worker (with no
tuning flags), the bare loop and the hand-written consumer under /usr/bin/time in
interleaved rounds (medians count), counts PostgreSQL transactions (or DynamoDB requests),
checks correctness, prints the table; then the side runs: a 100 ms handler, an idle queue
(ReceiveMessage calls per minute), big bodies sent while consumed (RSS over the run), the
scale run. Standard library only (boto3 used if importable).

--store picks the checkpoint store the worker runs and the 3-step run use:
  postgres (default): a fresh `sqsw_bench` database (dropped and created again), statements
      per message counted from pg_stat_database, then the scale run (a table of many rows);
  sqlite: a file in a fresh temp directory (removed at the end), no PostgreSQL needed;
      statements per message are not counted ("—") and the scale run is skipped;
  dynamodb (bench/run --store dynamodb): a fresh table `sqsw-bench-<hex>` on the endpoint
      in AWS_ENDPOINT_URL_DYNAMODB (default Dynoxide on 127.0.0.1:8000, which localstack/up
      starts), created with `sqs-worker migrate`. Requests per message are counted in a
      separate run of the worker (and of the 3-step handler) through a counting HTTP proxy
      in this script, so the speed runs go straight to the endpoint; the breakdown by
      operation is printed under the table. Completed checkpoints are counted with a
      consistent Scan if boto3 is importable, else the worker's own summary is checked
      (`processed` = unique events; the note says which). The table is deleted at the end
      with boto3; without it, it is left (Dynoxide keeps it in memory only). No scale run.
"""

import argparse
import http.client
import http.server
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROFILE = os.environ.get("SQS_WORKER_BENCH_PROFILE", "release")
WORKER = os.path.join(ROOT, f"target/{PROFILE}/sqs-worker")
BENCH = os.path.join(ROOT, f"target/{PROFILE}/examples/bench")
ADMIN = os.environ.get("ADMIN_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "sqsw_bench"
STORE_NAMES = {"postgres": "PostgreSQL", "sqlite": "SQLite", "dynamodb": "DynamoDB"}


def pg_url(db_name):
    return ADMIN.rsplit("/", 1)[0] + "/" + db_name


DB_URL = pg_url(DB_NAME)
ENV = dict(
    os.environ,
    AWS_ENDPOINT_URL=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
    AWS_ACCESS_KEY_ID="test",
    AWS_SECRET_ACCESS_KEY="test",
    AWS_REGION="us-east-1",
    # The DynamoDB store's endpoint (Dynoxide from localstack/up); AWS_ENDPOINT_URL is SQS's.
    AWS_ENDPOINT_URL_DYNAMODB=os.environ.get("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:8000"),
    DATABASE_URL=DB_URL,
    RUST_LOG=os.environ.get("RUST_LOG", "warn"),
    RUST_BACKTRACE="0",
)
# Tracing is off unless --otlp turns it on: no OpenTelemetry setting of the caller's leaks in.
for _name in [n for n in ENV if n.startswith("OTEL_")]:
    del ENV[_name]


def psql(url, sql):
    out = subprocess.run(["psql", "-Atq", url, "-c", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def transactions(db_name=DB_NAME):
    """Committed + rolled-back transactions of a bench database so far (each statement the
    worker sends outside an explicit transaction is one)."""
    return int(psql(ADMIN, f"select xact_commit + xact_rollback from pg_stat_database where datname = '{db_name}'"))


def timed(cmd, env=None):
    """Run cmd under /usr/bin/time (in env, default ENV); returns (stdout, user+sys seconds,
    peak RSS in MB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        out = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", t.name] + cmd,
                             env=env or ENV, check=True, capture_output=True, text=True)
        user, system, rss_kb = t.read().split()[-3:]
    return out.stdout, float(user) + float(system), int(rss_kb) / 1024


def bench(*args):
    return json.loads(subprocess.run([BENCH] + list(args), env=ENV, check=True,
                                     capture_output=True, text=True).stdout)


def fresh_queue():
    return bench("create-queue", "--name", "bench-" + uuid.uuid4().hex[:10])["queue_url"]


def seed(queue, n, dup):
    run_id = uuid.uuid4().hex[:8]
    out = bench("seed", "--queue-url", queue, "--count", str(n), "--duplicates", str(dup), "--run-id", run_id)
    return out["unique"]


def scope_of(queue):
    return queue.rsplit("/", 1)[1]


def counted(db_name, cmd):
    """timed(cmd), plus the statements it sent to PostgreSQL database db_name; None for
    statements when db_name is None (SQLite: pg_stat_database does not apply)."""
    before = None if db_name is None else transactions(db_name)
    stdout, cpu, rss = timed(cmd)
    if db_name is None:
        return stdout, cpu, rss, None
    time.sleep(0.5)  # statistics of ended backends are flushed at exit; let them land
    return stdout, cpu, rss, transactions(db_name) - before - 1  # minus the reading query itself


def worker_cmd(queue, db_url, extra=(), idle="3"):
    """`sqs-worker run` with no tuning flags: only the key, the built-in no-op handler, and an
    exit once the queue is drained (which also shortens the long polls at the end); `idle`
    None: no exit."""
    exit_when_idle = ["--exit-when-idle", idle] if idle else []
    return [WORKER, "run", "--database-url", db_url, "--queue-url", queue, "--key", "/id", "--handler", "noop",
            "--no-migrate", *exit_when_idle, *extra]


def last_json(stdout):
    """The worker's summary: the last line it prints."""
    return json.loads(stdout.strip().splitlines()[-1])


def run_worker(queue, db_url, db_name=None, extra=()):
    """The worker on db_url; db_name: its PostgreSQL database (statements counted), or None."""
    stdout, cpu, rss, statements = counted(db_name, worker_cmd(queue, db_url, extra))
    return last_json(stdout), cpu, rss, statements


# Hop-by-hop headers: each side of the proxy has its own connection (and the proxy answers
# `Expect: 100-continue` itself). Everything else is forwarded as it came.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "content-length"}


class RequestCounter:
    """A counting HTTP proxy in front of the DynamoDB endpoint, for a run whose
    AWS_ENDPOINT_URL_DYNAMODB is `url`: forwards each request as it came (method, path,
    headers with the signed Host, body) and relays the answer (status, headers, body),
    counting requests by operation (the X-Amz-Target header). Serves on a free port of
    127.0.0.1 while the `with` block runs."""

    def __init__(self, upstream):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.counts, self.lock = {}, threading.Lock()

    def __enter__(self):
        counter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

            def do_POST(self):
                counter.forward(self)

            do_GET = do_PUT = do_DELETE = do_POST

            def finish(self):
                super().finish()
                if hasattr(self, "upstream"):
                    self.upstream.close()

            def log_message(self, *_):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *_):
        self.server.shutdown()
        self.server.server_close()

    @property
    def total(self):
        return sum(self.counts.values())

    def forward(self, h):
        operation = h.headers.get("X-Amz-Target", "").rsplit(".", 1)[-1] or f"{h.command} {h.path}"
        with self.lock:
            self.counts[operation] = self.counts.get(operation, 0) + 1
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(h.rfile.readline().split(b";")[0], 16):
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
            while h.rfile.readline().strip():  # trailers
                pass
            body = b"".join(chunks)
        else:
            body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
        # One upstream connection per client connection (the handler serves one).
        if not hasattr(h, "upstream"):
            h.upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port or 80, timeout=60)
        try:
            h.upstream.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for name, value in h.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    h.upstream.putheader(name, value)
            h.upstream.putheader("Content-Length", str(len(body)))
            h.upstream.endheaders(body)
            response = h.upstream.getresponse()
            status, reason, headers, data = response.status, response.reason, response.getheaders(), response.read()
        except (OSError, http.client.HTTPException) as e:
            # No retry here: the client's retry is a request of its own, counted as such.
            h.upstream.close()
            status, reason, headers, data = 502, "Bad Gateway", [], f"proxy: {e!r}".encode()
        h.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                h.send_header(name, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def proxied(cmd):
    """Run cmd with its DynamoDB requests through a RequestCounter (a counting run, apart
    from the timed ones); returns (stdout, requests, {operation: requests})."""
    with RequestCounter(ENV["AWS_ENDPOINT_URL_DYNAMODB"]) as counter:
        stdout, _, _ = timed(cmd, dict(ENV, AWS_ENDPOINT_URL_DYNAMODB=counter.url))
    return stdout, counter.total, dict(sorted(counter.counts.items(), key=lambda kv: -kv[1]))


def dynamodb():
    """A boto3 DynamoDB client on the store's endpoint, or None if boto3 is not importable."""
    try:
        import boto3
    except ImportError:
        return None
    return boto3.client("dynamodb", endpoint_url=ENV["AWS_ENDPOINT_URL_DYNAMODB"], region_name=ENV["AWS_REGION"],
                        aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])


def drop_table(table):
    client = dynamodb()
    if client is None:
        print(f"Table {table} left on {ENV['AWS_ENDPOINT_URL_DYNAMODB']}: no boto3 to delete it "
              "(Dynoxide keeps tables in memory: it goes when the server stops).")
        return
    try:
        client.delete_table(TableName=table)
    except client.exceptions.ResourceNotFoundException:
        pass  # never created (migrate failed)


def complete_checkpoints(db_url, scope):
    """Completed checkpoints of scope; None for DynamoDB without boto3 (no way to read)."""
    if db_url.startswith("dynamodb://"):
        client = dynamodb()
        if client is None:
            return None
        # The store's partition key `C#{scope}#{key}`, the scope's `%` and `#` escaped.
        prefix = "C#" + scope.replace("%", "%25").replace("#", "%23") + "#"
        pages = client.get_paginator("scan").paginate(
            TableName=db_url.removeprefix("dynamodb://"), Select="COUNT", ConsistentRead=True,
            FilterExpression="begins_with(pk, :p) AND #s = :complete", ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":p": {"S": prefix}, ":complete": {"S": "complete"}})
        return sum(page["Count"] for page in pages)
    if db_url.startswith("sqlite:"):
        with sqlite3.connect(db_url.removeprefix("sqlite://")) as db:
            return db.execute("select count(*) from checkpoints where scope = ? and status = 'complete'",
                              (scope,)).fetchone()[0]
    return int(psql(db_url, f"select count(*) from checkpoints where scope = '{scope}' and status = 'complete'"))


def check(queue, unique, summary, db_url):
    complete = complete_checkpoints(db_url, scope_of(queue))
    left = bench("count", "--queue-url", queue)["messages"]
    bench("delete-queue", "--queue-url", queue)
    if complete is None:  # DynamoDB without boto3: the worker's own count
        complete, what = summary["processed"], "events processed (worker summary; no boto3 to scan the table)"
    else:
        what = "events complete" + (" (table scan)" if db_url.startswith("dynamodb://") else "")
    ok = complete == unique and left == 0
    return ok, f"{complete}/{unique} {what}, {left} left in queue"


def row(name, received, active_ms, cpu, rss, statements, correct, note=""):
    rate = received / (active_ms / 1000) if active_ms else 0.0
    return {"name": name, "messages": received, "rate": rate, "cpu_ms_per_1000": cpu * 1000 / received * 1000 if received else 0.0,
            "rss_mb": rss, "statements_per_message": (statements / received) if statements is not None and received else None,
            "correct": correct, "note": note}


def startup_ms(args, db_url, repeats=5):
    """Process start to the worker's 'worker starting' log line (its next call is the first
    ReceiveMessage), migrations already applied."""
    queue = fresh_queue()
    samples = []
    for _ in range(repeats):
        started = time.monotonic()
        proc = subprocess.Popen([WORKER, "--log-format", "json", "run", "--database-url", db_url,
                                 "--queue-url", queue, "--handler", "noop",
                                 "--no-migrate", "--exit-when-idle", "0.2", "--wait-time-seconds", "0"],
                                env=dict(ENV, RUST_LOG="info"), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        for line in proc.stderr:
            if "worker starting" in line:
                samples.append((time.monotonic() - started) * 1000)
                break
        proc.stderr.read()
        proc.wait()
    return statistics.median(samples)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--duplicates", type=float, default=0.2)
    p.add_argument("--pollers", type=int, default=8, help="pollers of the bare loop and the hand-written consumer")
    p.add_argument("--scale-rows", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of the bare loop, the hand-written consumer and the worker; medians count")
    p.add_argument("--idle-seconds", type=float, default=60, help="how long the idle run watches an empty queue")
    p.add_argument("--memory-messages", type=int, default=10_000, help="messages of the memory run (0: skip it)")
    p.add_argument("--memory-body-bytes", type=int, default=262_000)
    p.add_argument("--slow-messages", type=int, default=2_000, help="messages of the 100 ms handler run (0: skip it)")
    p.add_argument("--smoke", action="store_true", help="a few hundred messages, one round, small side runs")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    p.add_argument("--otlp", action="store_true",
                   help="export the worker's traces (OTLP/HTTP) to a local sink that discards them: the cost of tracing on")
    p.add_argument("--store", choices=sorted(STORE_NAMES), default="postgres",
                   help="the checkpoint store of the worker runs and the 3-step run (default: postgres)")
    args = p.parse_args()
    if args.otlp:
        import otlp_sink
        ENV["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_sink.start()
        ENV["OTEL_SERVICE_NAME"] = "sqs-worker-bench"
        print(f"tracing on: spans exported to {ENV['OTEL_EXPORTER_OTLP_ENDPOINT']} (a sink that discards them)")
    if args.smoke:
        args.messages, args.scale_rows, args.rounds = 300, 10_000, 1
        args.idle_seconds, args.memory_messages, args.memory_body_bytes, args.slow_messages = 3, 200, 16_384, 200

    if args.store == "sqlite":
        tmp = tempfile.mkdtemp(prefix="sqsw-bench-")
        try:
            benchmark(args, "sqlite://" + os.path.join(os.path.abspath(tmp), "bench.sqlite"), None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif args.store == "dynamodb":
        table = "sqsw-bench-" + uuid.uuid4().hex[:10]
        try:
            benchmark(args, "dynamodb://" + table, None)
        finally:
            drop_table(table)
    else:
        psql(ADMIN, f"drop database if exists {DB_NAME}")
        psql(ADMIN, f"create database {DB_NAME}")
        benchmark(args, DB_URL, DB_NAME)
    if args.otlp:
        import otlp_sink
        requests, size = otlp_sink.received()
        print(f"tracing on: the sink received {requests} OTLP requests, {size / 1e6:.1f} MB")


def median_row(runs):
    """The run of median rate among `runs` (rows of one kind, one per round), with the
    median CPU and the rates of every round noted."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    mid = dict(ordered[len(ordered) // 2])
    mid["cpu_ms_per_1000"] = statistics.median(r["cpu_ms_per_1000"] for r in runs)
    mid["rss_mb"] = max(r["rss_mb"] for r in runs)
    mid["rounds"] = [round(r["rate"]) for r in runs]
    mid["correct"] = all(r["correct"] for r in runs)
    mid["note"] = "; ".join(sorted({r["note"] for r in runs}))
    return mid


class Runs:
    """The runs of one benchmark, on the store at db_url (db_name: its PostgreSQL database,
    whose statements are counted, or None), each on a fresh seeded queue."""

    def __init__(self, args, db_url, db_name):
        self.args, self.db_url, self.db_name = args, db_url, db_name
        self.store = STORE_NAMES[args.store]
        self.failures = []

    def checked(self, r, queue, unique, summary, db_url=None):
        ok, note = check(queue, unique, summary, db_url or self.db_url)
        r.update(correct=ok, note=note)
        if not ok:
            self.failures.append(f"{r['name']}: {note}")
        return r

    def bare(self):
        q = fresh_queue()
        n = self.args.messages
        seed(q, n, self.args.duplicates)
        stdout, cpu, rss = timed([BENCH, "bare", "--queue-url", q, "--pollers", str(self.args.pollers),
                                  "--expect", str(n), "--attributes"])
        out = json.loads(stdout)
        left = bench("count", "--queue-url", q)["messages"]
        bench("delete-queue", "--queue-url", q)
        r = row(f"bare receive+delete loop, {self.args.pollers} pollers", out["received"], out["active_secs"] * 1000,
                cpu, rss, None, left == 0, f"{left} left in queue")
        if left:
            self.failures.append(f"{r['name']}: {left} left in queue")
        return r

    def handwritten(self):
        """The hand-written consumer, on a database of its own next to the bench database."""
        db = DB_NAME + "_handwritten"
        psql(ADMIN, f"drop database if exists {db}")
        psql(ADMIN, f"create database {db}")
        q = fresh_queue()
        n = self.args.messages
        unique = seed(q, n, self.args.duplicates)
        stdout, cpu, rss, statements = counted(db, [BENCH, "handwritten", "--queue-url", q, "--database-url", pg_url(db),
                                                    "--pollers", str(self.args.pollers), "--expect", str(n)])
        out = json.loads(stdout)
        left = bench("count", "--queue-url", q)["messages"]
        bench("delete-queue", "--queue-url", q)
        psql(ADMIN, f"drop database {db}")
        ok = out["unique_events"] == unique and left == 0
        note = f"{out['unique_events']}/{unique} events inserted, {left} left in queue"
        r = row(f"hand-written Rust (aws-sdk-sqs + sqlx, {self.args.pollers} pollers, an insert per message)",
                out["received"], out["active_secs"] * 1000, cpu, rss, statements - 2, ok, note)  # minus its create and count
        if not ok:
            self.failures.append(f"{r['name']}: {note}")
        return r

    def worker(self, db_url=None, db_name=None, label=None):
        db_url, db_name = db_url or self.db_url, db_name if db_url else self.db_name
        q = fresh_queue()
        unique = seed(q, self.args.messages, self.args.duplicates)
        summary, cpu, rss, statements = run_worker(q, db_url, db_name)
        name = label or f"sqs-worker run --handler noop, no tuning flags ({self.store})"
        r = row(name, summary["received"], summary["active_millis"], cpu, rss, statements, True)
        r["peak_pollers"] = summary.get("peak_pollers")
        return self.checked(r, q, unique, summary, db_url)

    def steps_cmd(self, queue):
        return [BENCH, "steps", "--queue-url", queue, "--database-url", self.db_url]

    def steps(self):
        q = fresh_queue()
        unique = seed(q, self.args.messages, self.args.duplicates)
        stdout, cpu, rss, statements = counted(self.db_name, self.steps_cmd(q))
        summary = json.loads(stdout)
        r = row(f"3-step handler (library, defaults, {self.store})", summary["received"], summary["active_millis"],
                cpu, rss, statements, True)
        r["statements_per_event"] = statements / unique if statements is not None else None
        return self.checked(r, q, unique, summary)

    def slow(self):
        """A handler of 100 ms per event with the defaults: the handlers set the pace, and
        receiving must keep to it (whole batches, no extra pollers)."""
        q = fresh_queue()
        n = self.args.slow_messages
        unique = seed(q, n, 0)
        stdout, cpu, rss = timed([BENCH, "slow", "--queue-url", q, "--database-url", self.db_url])
        summary = json.loads(stdout)
        r = row(f"100 ms handler (library, defaults, {self.store})", summary["received"], summary["active_millis"],
                cpu, rss, None, True)
        r.update(receive_calls=summary["receive_calls"], empty_receives=summary["empty_receives"],
                 peak_pollers=summary["peak_pollers"])
        return self.checked(r, q, unique, summary)

    def idle(self):
        """The worker on an empty queue for --idle-seconds: its ReceiveMessage calls per minute,
        read from /metrics (the process is then killed: nothing is in flight)."""
        q = fresh_queue()
        port = free_port()
        proc = subprocess.Popen(worker_cmd(q, self.db_url, ["--metrics-addr", f"127.0.0.1:{port}"], idle=None),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_metrics(port)
            start = scrape(port)
            time.sleep(self.args.idle_seconds)
            end = scrape(port)
        finally:
            proc.kill()
            proc.wait()
        bench("delete-queue", "--queue-url", q)
        calls = end.get("sqs_worker_receive_calls_total", 0) - start.get("sqs_worker_receive_calls_total", 0)
        return {"seconds": self.args.idle_seconds, "receive_calls": calls,
                "per_minute": calls * 60 / self.args.idle_seconds, "pollers": end.get("sqs_worker_pollers")}

    def memory(self):
        """Big bodies at --concurrency 100, sent while the worker consumes: the worker's RSS,
        sampled with its received count from /metrics."""
        q = fresh_queue()
        n, size = self.args.memory_messages, self.args.memory_body_bytes
        port = free_port()
        producer = subprocess.Popen([BENCH, "produce", "--queue-url", q, "--count", str(n), "--body-bytes", str(size),
                                     "--run-id", uuid.uuid4().hex[:8]], env=ENV, stdout=subprocess.PIPE, text=True)
        worker = subprocess.Popen(worker_cmd(q, self.db_url, ["--concurrency", "100", "--metrics-addr",
                                                               f"127.0.0.1:{port}"], idle="10"),
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        samples = []  # (received, rss MB)
        try:
            wait_for_metrics(port)
            while worker.poll() is None:
                received = scrape(port).get("sqs_worker_received_total", 0)
                samples.append((received, rss_mb(worker.pid)))
                time.sleep(0.2)
        except OSError:
            pass  # the worker exited between two samples
        producer.wait()
        summary = last_json(worker.stdout.read())
        bench("delete-queue", "--queue-url", q)
        received = summary["received"]
        first = [rss for got, rss in samples if got <= 2000] or [0]
        last = [rss for got, rss in samples if got >= received - 2000] or [0]
        ok = summary["processed"] == n
        if not ok:
            self.failures.append(f"memory run: {summary['processed']}/{n} events processed")
        return {"messages": n, "body_bytes": size, "peak_rss_mb": max((r for _, r in samples), default=0),
                "first_2000_peak_mb": max(first), "last_2000_peak_mb": max(last), "processed": summary["processed"],
                "correct": ok}

    def scale(self):
        """Throughput with --scale-rows completed checkpoints in the table, alternated with runs
        on an empty database (PostgreSQL only)."""
        args, db_url = self.args, self.db_url
        t0 = time.monotonic()
        psql(db_url, f"""insert into checkpoints (scope, idempotency_key, status, payload_sha256, first_message_id,
                          last_message_id, created_at, updated_at, completed_at)
                        select 'bulk', 'old-' || g, 'complete', 'h', 'm', 'm', now() - interval '40 days',
                               now() - interval '40 days', now() - interval '40 days'
                        from generate_series(1, {args.scale_rows}) g""")
        # Let the bulk insert settle (statistics, hint bits, a checkpoint) so the runs below
        # measure the table's size, not the aftermath of filling it.
        psql(db_url, "vacuum (analyze) checkpoints")
        psql(db_url, "checkpoint")
        fill = time.monotonic() - t0
        empty_db = DB_NAME + "_empty"
        psql(ADMIN, f"drop database if exists {empty_db}")
        psql(ADMIN, f"create database {empty_db}")
        subprocess.run([WORKER, "migrate", "--database-url", pg_url(empty_db)], env=ENV, check=True, capture_output=True)
        empty, full = [], []
        for _ in range(args.rounds):
            empty.append(self.worker(pg_url(empty_db), empty_db, f"sqs-worker run, empty table, alongside ({self.store})"))
            full.append(self.worker(db_url, DB_NAME, f"sqs-worker run, {args.scale_rows:,} rows in the table ({self.store})"))
        psql(ADMIN, f"drop database {empty_db}")
        out = subprocess.run([WORKER, "checkpoints", "prune", "--database-url", db_url, "--older-than", "30d", "--scope",
                              "bulk", "--format", "json"], env=ENV, check=True, capture_output=True, text=True)
        pruned = json.loads(out.stdout)
        if pruned["deleted"] != args.scale_rows:
            self.failures.append(f"prune deleted {pruned['deleted']} of {args.scale_rows} rows")
        empty, full = median_row(empty), median_row(full)
        return [empty, full], {"rows": args.scale_rows, "fill_seconds": fill,
                               "rate_ratio": full["rate"] / empty["rate"] if empty["rate"] else 0, "pruned": pruned}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    """The worker's /metrics as {metric name: value} (labels dropped: one queue)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values


def wait_for_metrics(port, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def benchmark(args, db_url, db_name):
    """The runs and the table, on the store at db_url; db_name: its PostgreSQL database
    (statements counted, hand-written peer, scale run), or None (SQLite, DynamoDB)."""
    ENV["DATABASE_URL"] = db_url
    subprocess.run([WORKER, "migrate", "--database-url", db_url], env=ENV, check=True, capture_output=True)
    runs = Runs(args, db_url, db_name)
    # The ceiling (receive + delete, no database), the hand-written peer (PostgreSQL) and the
    # worker, interleaved round by round so LocalStack's drift weighs on all alike; medians.
    kinds = {"bare": [], "handwritten": [], "worker": [], "steps": []}
    for _ in range(args.rounds):
        kinds["bare"].append(runs.bare())
        if db_name:
            kinds["handwritten"].append(runs.handwritten())
        kinds["worker"].append(runs.worker())
        kinds["steps"].append(runs.steps())
    rows = [median_row(kinds[k]) for k in ("bare", "handwritten", "worker", "steps") if kinds[k]]
    bare, worker, steps = rows[0], rows[-2], rows[-1]
    handwritten = rows[1] if db_name else None

    # DynamoDB: requests per message, counted in separate runs through a counting proxy.
    requests = []
    if args.store == "dynamodb":
        for r, cmd in ((worker, worker_cmd), (steps, None)):
            q = fresh_queue()
            unique = seed(q, args.messages, args.duplicates)
            command = worker_cmd(q, db_url) if cmd else runs.steps_cmd(q)
            stdout, total, operations = proxied(command)
            summary = last_json(stdout)
            ok, note = check(q, unique, summary, db_url)
            if not ok:
                runs.failures.append(f"{r['name']}, counting run through the proxy: {note}")
            r["statements_per_message"] = total / summary["received"] if summary["received"] else None
            r["statements_per_event"] = total / unique
            requests.append((r, total, summary["received"], operations))

    slow = runs.slow() if args.slow_messages else None
    idle = runs.idle()
    memory = runs.memory() if args.memory_messages else None
    scale = None
    scale_skipped = bool(args.scale_rows) and db_name is None
    if args.scale_rows and not scale_skipped:
        scale_rows, scale = runs.scale()
        rows += scale_rows
    start_ms = startup_ms(args, db_url)
    print_report(args, rows, bare, handwritten, worker, steps, slow, idle, memory, scale, scale_skipped, requests,
                 start_ms)
    if args.json:
        print(json.dumps({"store": args.store, "rows": rows, "slow": slow, "idle": idle, "memory": memory,
                          "scale": scale, "startup_ms": start_ms,
                          "dynamodb_requests": [{"run": r["name"], "requests": total, "messages": received,
                                                 "operations": operations}
                                                for r, total, received, operations in requests]}, indent=2))
    if runs.failures:
        print("FAILED: " + "; ".join(runs.failures), file=sys.stderr)
        sys.exit(1)


def print_report(args, rows, bare, handwritten, worker, steps, slow, idle, memory, scale, scale_skipped, requests,
                 start_ms):
    store = STORE_NAMES[args.store]
    print()
    print(f"{args.messages:,} messages ({args.duplicates:.0%} duplicate deliveries), checkpoint store: {store}; "
          f"medians of {args.rounds} interleaved round(s)")
    print()
    peer = handwritten or bare
    print(f"| run | msgs/s (rounds) | vs bare | vs hand-written | CPU ms / 1,000 msgs | vs bare | peak RSS MB | "
          f"DB statements or requests / msg | correct |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        spm = "—" if r["statements_per_message"] is None else f"{r['statements_per_message']:.3f}"
        rounds = "/".join(f"{x:,}" for x in r.get("rounds", []))
        vs_peer = f"{r['rate'] / peer['rate']:.2f}×" if handwritten else "—"
        print(f"| {r['name']} | {r['rate']:,.0f} ({rounds}) | {r['rate'] / bare['rate']:.2f}× | {vs_peer} | "
              f"{r['cpu_ms_per_1000']:,.0f} | {r['cpu_ms_per_1000'] / bare['cpu_ms_per_1000']:.2f}× | "
              f"{r['rss_mb']:.1f} | {spm} | {'yes' if r['correct'] else 'NO'}: {r['note']} |")
    print()
    if steps.get("statements_per_event") is not None:
        print(f"3-step path: {steps['rate'] / worker['rate']:.2f}× the no-op path's throughput, "
              f"{steps['statements_per_event']:.3f} store statements or requests per event (claim, three steps, "
              f"completion; duplicate deliveries included)")
    if worker.get("peak_pollers") is not None:
        print(f"Pollers at the defaults: peak {worker['peak_pollers']} (of --max-pollers 10)")
    for r, total, received, operations in requests:
        print(f"DynamoDB requests, {r['name']} (a separate run through a counting proxy): {total:,} for "
              f"{received:,} messages = {total / received if received else 0:.3f} / msg: "
              + ", ".join(f"{op} {count:,} ({count / received if received else 0:.3f})" for op, count in operations.items()))
    if slow:
        print(f"100 ms handler: {slow['rate']:,.0f} msgs/s, {slow['receive_calls']} ReceiveMessage calls for "
              f"{slow['messages']:,} messages ({slow['receive_calls'] / slow['messages']:.3f} per message, "
              f"{slow['empty_receives']} empty), peak pollers {slow['peak_pollers']}")
    print(f"Idle queue: {idle['receive_calls']:.0f} ReceiveMessage calls in {idle['seconds']:.0f} s "
          f"= {idle['per_minute']:.1f} per minute, {idle['pollers']:.0f} poller(s)")
    if memory:
        print(f"Memory: {memory['messages']:,} bodies of {memory['body_bytes']:,} bytes at --concurrency 100, sent while "
              f"consumed: peak RSS {memory['peak_rss_mb']:.1f} MB; peak over the first 2,000 {memory['first_2000_peak_mb']:.1f} MB, "
              f"over the last 2,000 {memory['last_2000_peak_mb']:.1f} MB; {memory['processed']:,} processed")
    if scale:
        print(f"Scale: {scale['rows']:,} completed rows (filled in {scale['fill_seconds']:.1f} s): throughput "
              f"{scale['rate_ratio']:.0%} of the empty-table runs alongside; `checkpoints prune --older-than 30d` deleted "
              f"{scale['pruned']['deleted']:,} rows in {scale['pruned']['statements']} statements, "
              f"{scale['pruned']['seconds']:.1f} s.")
    elif scale_skipped:
        print(f"Scale run ({args.scale_rows:,} rows) skipped: it is PostgreSQL-only (--store {args.store}).")
    print(f"Start to first ReceiveMessage (migrations applied, median of 5): {start_ms:.0f} ms")


if __name__ == "__main__":
    main()
