"""Parameter-server training with tf.distribute.ParameterServerStrategy.

The shape follows TensorFlow's tutorial "Parameter server training with
ParameterServerStrategy": one program for every role, picked from TF_CONFIG.
  ps, worker  start a tf.distribute.Server and serve until killed;
  chief       the coordinator: owns the training loop and decides success;
  evaluator   has nothing to evaluate (see below) and waits to be stopped.

The data are synthetic (fixed seed), so nothing is downloaded.
Env: TRAIN_STEPS (default 300), BATCH_SIZE (global, default 64), LOG_EVERY (default 50).
"""

import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf

TRAIN_STEPS = int(os.environ.get("TRAIN_STEPS", "300"))
BATCH_SIZE = int(os.environ.get("BATCH_SIZE", "64"))
LOG_EVERY = int(os.environ.get("LOG_EVERY", "50"))
FEATURES, HIDDEN, SEED = 20, 16, 42


def log(msg):
    # flush: the operator's log collection should see progress while it happens.
    print(f"[train.py {ROLE}] {msg}", flush=True)


def make_data(n, seed):
    """A fixed linear concept with label noise: learnable, but not to 100 %."""
    rng = np.random.default_rng(seed)
    w_true = np.random.default_rng(SEED).normal(size=FEATURES)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x @ w_true + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


def serve(resolver):
    # From the tutorial: makes a task's failed RPCs to a lost peer fail at once and
    # reach the coordinator (which then reschedules) instead of retrying silently.
    os.environ["GRPC_FAIL_FAST"] = "use_caller"
    # No thread settings here: the contexts that run the chief's steps on this task
    # take the chief's tf.config (sent when it connects), and where that leaves a
    # count at 0, this process's TF_NUM_INTEROP_THREADS / TF_NUM_INTRAOP_THREADS or
    # its core count. (Checked on TF 2.21: even one inter-op thread does not deadlock.)
    server = tf.distribute.Server(
        resolver.cluster_spec(),
        job_name=resolver.task_type,
        task_index=resolver.task_id,
        protocol=resolver.rpc_layer or "grpc",
        start=True,
    )
    log(f"server up at {server.target}; serving until killed")
    # Never returns: ps and worker servers do not exit on their own, whether the
    # chief succeeds or fails. The operator deletes them when the job ends.
    server.join()


def evaluate_sidecar():
    # The tutorial's evaluator is a sidecar (tf.keras.utils.SidecarEvaluator) that
    # reads the chief's checkpoints from shared storage. This example writes none,
    # so there is nothing to evaluate; the chief evaluates in-process instead. Wait
    # for the operator to stop us when the chief finishes, and exit 0 on SIGTERM so
    # that stop is not mistaken for a failure.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log("no checkpoint directory to evaluate; the chief evaluates. Waiting to be stopped.")
    while True:
        signal.pause()


def coordinate(resolver):
    t0 = time.time()
    num_ps = len(resolver.cluster_spec().as_dict().get("ps", []))
    # Shards variables of >= 256 KiB across the ps tasks (the tutorial's setting);
    # this model is small, so every variable stays whole on one ps.
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=256 << 10, max_shards=max(num_ps, 1)
    )
    # Connects to every ps and worker; a task that is not up yet is retried, so the
    # chief may start first.
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    log(f"connected to the cluster in {time.time() - t0:.1f} s: {num_ps} ps, {strategy.num_replicas_in_sync} replica(s) per step")

    # Plain tf.Variables rather than Keras: Keras 3 (TF's default tf.keras) has no
    # ParameterServerStrategy support at all. Created in scope, they live on the ps.
    with strategy.scope():
        init = tf.random_normal_initializer(stddev=0.1, seed=SEED)
        w1 = tf.Variable(init([FEATURES, HIDDEN]), name="w1")
        b1 = tf.Variable(tf.zeros([HIDDEN]), name="b1")
        w2 = tf.Variable(init([HIDDEN, 2]), name="w2")
        b2 = tf.Variable(tf.zeros([2]), name="b2")
    params = [w1, b1, w2, b2]

    def model(x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2) + b2

    def dataset_fn(input_context):
        # Built on each worker; each one reads its own shard, reshuffled every pass.
        x, y = make_data(8192, SEED + 1)
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        ds = ds.shuffle(1024, seed=SEED).repeat()
        return ds.batch(input_context.get_per_replica_batch_size(BATCH_SIZE)).prefetch(2)

    @tf.function
    def per_worker_dataset_fn():
        return strategy.distribute_datasets_from_function(dataset_fn)

    per_worker_iterator = iter(coordinator.create_per_worker_dataset(per_worker_dataset_fn))

    @tf.function
    def step_fn(iterator):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
                )
            # Asynchronous SGD: each worker updates the ps variables as its step ends.
            for v, g in zip(params, tape.gradient(loss, params)):
                v.assign_sub(0.1 * g)
            return loss

        x, y = next(iterator)
        losses = strategy.run(replica_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None)

    log(f"training {TRAIN_STEPS} steps, global batch {BATCH_SIZE}")
    done = 0
    while done < TRAIN_STEPS:
        n = min(LOG_EVERY, TRAIN_STEPS - done)
        # schedule() only queues the step; any idle worker takes it.
        for _ in range(n):
            loss = coordinator.schedule(step_fn, args=(per_worker_iterator,))
        coordinator.join()  # barrier: every queued step has run
        done += n
        log(f"step {done}/{TRAIN_STEPS} loss {loss.fetch():.4f}")

    # Held-out data, evaluated here on the chief: reading the variables pulls them
    # from the ps tasks.
    x_eval, y_eval = make_data(2048, SEED + 2)
    logits = model(tf.constant(x_eval))
    eval_loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_eval, logits=logits)
    ).numpy()
    accuracy = float(np.mean(np.argmax(logits.numpy(), axis=1) == y_eval))
    log(f"final eval loss {eval_loss:.4f} accuracy {accuracy:.4f} after {TRAIN_STEPS} steps in {time.time() - t0:.1f} s")


cluster_resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
ROLE = f"{cluster_resolver.task_type}-{cluster_resolver.task_id}"

if cluster_resolver.task_type in ("worker", "ps"):
    serve(cluster_resolver)
elif cluster_resolver.task_type == "evaluator":
    evaluate_sidecar()
else:
    coordinate(cluster_resolver)
    # Exit 0 is the job's success signal: the operator marks the job Succeeded on it.
    sys.exit(0)
