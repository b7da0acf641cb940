"""TensorFlow's own parameter-server training, measured for comparison with kubetrain.

Fashion-MNIST, MLP 784-256-10, heavy-ball SGD (v = m*v + g; w -= lr*v), batch 256
per worker, 3 epochs. Two modes:
  --mode single  one process, no strategy: the baseline.
  --mode ps      1 ps + N workers on localhost, spawned by this script as
                 subprocesses (each with its own TF_CONFIG, as a TFJob gives each
                 pod), with the coordinator (chief) in this process.
The last stdout line is one JSON object; progress goes to stderr.

Structure follows examples/tensorflow/train.py: plain tf.Variables (Keras 3 has no
ParameterServerStrategy support), TFConfigClusterResolver, ClusterCoordinator.
"""

import argparse
import ctypes
import gzip
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported, or it is ignored

import numpy as np
import tensorflow as tf

TRAIN_SIZE, PIXELS, CLASSES = 60000, 784, 10


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["single", "ps"], default="single")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="per worker")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--intra-op", type=int, default=1, help="single mode and workers")
    p.add_argument("--inter-op", type=int, default=2, help="single mode and workers")
    p.add_argument("--ps-intra-op", type=int, default=1)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    # Internal: a spawned ps/worker task. Its cluster comes from TF_CONFIG.
    p.add_argument("--role", choices=["ps", "worker"], help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


def log(msg):
    print(f"[ps_strategy] {msg}", file=sys.stderr, flush=True)


def read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def unpack_train(data_dir, out_dir):
    """Decompresses the training set to raw files that tf.data reads on each worker.

    The arrays cannot travel inside dataset_fn: it is traced here and shipped to the
    workers, so a from_tensor_slices of 47 MB would be a constant in the graph. Raw
    files also keep gunzip out of the timed window.
    """
    images = read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"), 16)
    labels = read_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz"), 8)
    assert images.size == TRAIN_SIZE * PIXELS and labels.size == TRAIN_SIZE
    paths = os.path.join(out_dir, "train-images.raw"), os.path.join(out_dir, "train-labels.raw")
    images.tofile(paths[0])
    labels.tofile(paths[1])
    return paths


def load_test(data_dir):
    x = read_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"), 16)
    y = read_idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"), 8)
    return (x.reshape(-1, PIXELS).astype(np.float32) / 255.0), y.astype(np.int64)


def make_dataset(paths, batch, seed, num_shards, shard_id):
    images = tf.data.FixedLengthRecordDataset(paths[0], PIXELS)
    labels = tf.data.FixedLengthRecordDataset(paths[1], 1)
    ds = tf.data.Dataset.zip((images, labels)).shard(num_shards, shard_id).cache()
    # Full-shard buffer: a true per-epoch permutation, reshuffled on every pass.
    ds = ds.shuffle(TRAIN_SIZE // num_shards + 1, seed=seed + shard_id).repeat()

    def decode(x, y):  # per batch, not per example: far fewer op dispatches
        x = tf.cast(tf.io.decode_raw(x, tf.uint8), tf.float32) / 255.0
        y = tf.reshape(tf.cast(tf.io.decode_raw(y, tf.uint8), tf.int64), [-1])
        return x, y

    return ds.batch(batch, drop_remainder=True).map(decode).prefetch(2)


def make_params(args):
    """Glorot-uniform weights, zero biases, from numpy so both modes start identically.

    Call inside strategy.scope() in ps mode: weights and momentum slots then live on
    the ps, so the slots are shared by all workers like the weights themselves.
    """
    rng = np.random.default_rng(args.seed)

    def glorot(fan_in, fan_out):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)

    params = [
        tf.Variable(glorot(PIXELS, args.hidden), name="w1"),
        tf.Variable(np.zeros(args.hidden, np.float32), name="b1"),
        tf.Variable(glorot(args.hidden, CLASSES), name="w2"),
        tf.Variable(np.zeros(CLASSES, np.float32), name="b2"),
    ]
    slots = [tf.Variable(tf.zeros_like(v), trainable=False, name=v.name.split(":")[0] + "_v") for v in params]
    return params, slots


def model(params, x):
    w1, b1, w2, b2 = params
    return tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2) + b2


def train_on_batch(args, params, slots, x, y):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(params, x)))
    for w, v, g in zip(params, slots, tape.gradient(loss, params)):
        # On the variable's device, as TF's optimizers place their updates: only the
        # gradient goes to the ps, not the slot there and back. No lock: with several
        # workers this is TF's default asynchronous (racy) update.
        with tf.device(w.device):
            new_v = args.momentum * v + g
            v.assign(new_v)
            w.assign_sub(args.lr * new_v)
    return loss


def accuracy(params, x, y):
    logits = model(params, tf.constant(x)).numpy()  # ps mode: reading pulls the variables
    return float(np.mean(np.argmax(logits, axis=1) == y))


def run_single(args, paths, test):
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    params, slots = make_params(args)
    it = iter(make_dataset(paths, args.batch_size, args.seed, 1, 0))
    step = tf.function(lambda: train_on_batch(args, params, slots, *next(it)))
    total = math.ceil(args.epochs * TRAIN_SIZE / args.batch_size)

    for _ in range(args.warmup_steps):
        loss = step()
    loss.numpy()  # wait: the clock must not start with work in flight
    t0 = time.perf_counter()
    for i in range(args.warmup_steps, total):
        loss = step()
        if (i + 1) % args.log_every == 0:
            log(f"step {i + 1}/{total} loss {loss.numpy():.4f}")
    loss.numpy()
    seconds = time.perf_counter() - t0
    return total, total - args.warmup_steps, seconds, accuracy(params, *test)


def free_ports(n):
    # Hold all sockets until all are picked, so no port is handed out twice.
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def spawn_cluster(args):
    ports = free_ports(2 + args.workers)
    addr = [f"127.0.0.1:{p}" for p in ports]
    cluster = {"chief": addr[:1], "ps": addr[1:2], "worker": addr[2:]}
    tasks = [("ps", 0)] + [("worker", i) for i in range(args.workers)]
    procs = []
    for job, index in tasks:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": job, "index": index}}))
        cmd = [sys.executable, os.path.abspath(__file__), "--role", job, "--parent-pid", str(os.getpid()),
               "--intra-op", str(args.ps_intra_op if job == "ps" else args.intra_op), "--inter-op", str(args.inter_op)]
        # Children's stdout goes to our stderr: our stdout must end with the JSON line.
        procs.append(subprocess.Popen(cmd, env=env, stdout=sys.stderr))
    os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
    return procs


def stop_cluster(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()  # servers have no shutdown RPC; SIGTERM ends them at once
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def serve(args):
    # Dies with the coordinator even if it is SIGKILLed and never reaches its finally.
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != args.parent_pid:
        sys.exit(1)
    # Belt and braces: the chief sends its own thread settings when it connects, and
    # where those are 0 the task falls back to these env vars, then to its core count.
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.intra_op)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(args.inter_op)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=args.intra_op,
                                      inter_op_parallelism_threads=args.inter_op)
    server = tf.distribute.Server(resolver.cluster_spec(), job_name=resolver.task_type,
                                  task_index=resolver.task_id, protocol="grpc", config=config, start=True)
    server.join()  # never returns; stop_cluster kills us


def run_ps(args, paths, test):
    # Sent to every task on connect, so the workers run the steps with 1 intra-op and
    # 2 inter-op threads (and the ps with 1 intra-op thread), whatever their own defaults.
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    t_start = time.perf_counter()
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    # No partitioner: every variable whole on the single ps (round-robin if more).
    strategy = tf.distribute.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    with strategy.scope():
        params, slots = make_params(args)

    def dataset_fn(ctx):  # runs on each worker: its own shard of the raw files
        return make_dataset(paths, ctx.get_per_replica_batch_size(args.batch_size), args.seed,
                            ctx.num_input_pipelines, ctx.input_pipeline_id)

    @tf.function
    def per_worker_dataset_fn():
        return strategy.distribute_datasets_from_function(dataset_fn)

    iterator = iter(coordinator.create_per_worker_dataset(per_worker_dataset_fn))

    @tf.function
    def step_fn(iterator):
        x, y = next(iterator)
        loss = strategy.run(lambda x, y: train_on_batch(args, params, slots, x, y), args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None)

    log(f"cluster of 1 ps + {args.workers} workers connected in {time.perf_counter() - t_start:.1f} s")
    # Each scheduled step is one worker's batch; any idle worker takes the next one.
    total = math.ceil(args.epochs * TRAIN_SIZE / args.batch_size)
    for _ in range(args.warmup_steps):  # tracing, function registration, iterator setup
        coordinator.schedule(step_fn, args=(iterator,))
    coordinator.join()
    t0 = time.perf_counter()
    pending = None
    for i in range(args.warmup_steps, total):
        loss = coordinator.schedule(step_fn, args=(iterator,))
        if (i + 1) % args.log_every == 0:
            # Fetch the loss from log_every steps back, which is long done: a join here
            # would drain the queue and idle the workers inside the timed window.
            if pending:
                log(f"step {pending[0]}/{total} loss {pending[1].fetch():.4f}")
            pending = (i + 1, loss)
    coordinator.join()
    seconds = time.perf_counter() - t0
    if pending:
        log(f"step {pending[0]}/{total} loss {pending[1].fetch():.4f}")
    return total, total - args.warmup_steps, seconds, accuracy(params, *test)


def main():
    args = parse_args()
    if args.role:
        return serve(args)
    procs, tmp = [], tempfile.mkdtemp(prefix="ps_strategy-")
    try:
        paths = unpack_train(args.data_dir, tmp)
        test = load_test(args.data_dir)
        if args.mode == "single":
            steps, timed, seconds, acc = run_single(args, paths, test)
        else:
            procs = spawn_cluster(args)
            steps, timed, seconds, acc = run_ps(args, paths, test)
    finally:
        stop_cluster(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "mode": args.mode,
        "workers": args.workers if args.mode == "ps" else 1,
        "samples_per_second": round(timed * args.batch_size / seconds, 1),
        "test_accuracy": round(acc, 4),
        "steps": steps,
        "timed_steps": timed,
        "seconds": round(seconds, 3),
        "batch_size": args.batch_size,
        "tf_version": tf.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        main()
        code = 0
    except Exception:
        import traceback
        traceback.print_exc()
        code = 1
    # Skip interpreter teardown: in ps mode the coordinator's threads still watch the
    # workers just killed, and TF's teardown with live remote contexts is not something
    # a benchmark should wait on. All output is flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
