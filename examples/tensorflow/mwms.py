"""Synchronous data-parallel Keras training with tf.distribute.MultiWorkerMirroredStrategy.

Every pod is a "worker" and runs this same program; there is no ps and no chief, so
worker 0 is TF's implicit chief (it leads the coordination service and is the one
that would write checkpoints). Each step all-reduces the gradients across workers,
so all of them must be up: the first collective waits for the late ones.

Plain TensorFlow and its bundled Keras 3 only (what the stock tensorflow/tensorflow
image has; no tf-keras). The model, loss and optimizer are Keras, but training is a
custom loop, not model.fit: Keras 3's fit fails under this strategy (it reduces the
first (x, y) batch as one nested value, which MultiWorkerMirroredStrategy rejects;
keras-team/keras#20585). Keras 3's optimizer itself works here: apply_gradients in
replica context all-reduces (sums) the gradients across workers, then updates the
mirrored variables.

The data are synthetic (fixed seed), so nothing is downloaded.
Env: EPOCHS (default 3), STEPS_PER_EPOCH (default 50), BATCH_PER_WORKER (default 32).
"""

import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

EPOCHS = int(os.environ.get("EPOCHS", "3"))
STEPS_PER_EPOCH = int(os.environ.get("STEPS_PER_EPOCH", "50"))
BATCH_PER_WORKER = int(os.environ.get("BATCH_PER_WORKER", "32"))
FEATURES, SEED = 20, 42

task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
ROLE = f"{task.get('type', 'local')}-{task.get('index', 0)}"


def log(msg):
    print(f"[mwms.py {ROLE}] {msg}", flush=True)


t0 = time.time()
# Must come before any other TF op: it starts this task's gRPC server (on the port of
# its own TF_CONFIG entry) and joins the coordination service led by worker 0.
strategy = tf.distribute.MultiWorkerMirroredStrategy()
log(f"strategy ready in {time.time() - t0:.1f} s: {strategy.num_replicas_in_sync} replicas in sync")
GLOBAL_BATCH = BATCH_PER_WORKER * strategy.num_replicas_in_sync


def make_data(n, seed):
    """A fixed linear concept with label noise: learnable, but not to 100 %."""
    rng = np.random.default_rng(seed)
    w_true = np.random.default_rng(SEED).normal(size=FEATURES)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x @ w_true + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return x, y


x, y = make_data(8192, SEED + 1)


def dataset_fn(input_context):
    # Every worker builds the same examples and keeps its own 1/n of them, so together
    # they cover the set once per pass; the batch here is this replica's share.
    batch = input_context.get_per_replica_batch_size(GLOBAL_BATCH)
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        .shuffle(1024, seed=SEED)
        .repeat()
        .batch(batch, drop_remainder=True)
        .prefetch(2)
    )


iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

# Variables created in scope are mirrored on every worker and kept equal by all-reduce.
with strategy.scope():
    tf.keras.utils.set_random_seed(SEED)  # same initial weights everywhere
    model = tf.keras.Sequential(
        [
            tf.keras.Input((FEATURES,)),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(2),
        ]
    )
    optimizer = tf.keras.optimizers.SGD(0.1)
    # Built here, not lazily in the first apply_gradients: that would create its
    # variables inside the tf.function, in replica context.
    optimizer.build(model.trainable_variables)
    # Per example: the average over the global batch is taken below, by hand.
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


@tf.function
def train_step(iterator):
    def step_fn(xb, yb):
        with tf.GradientTape() as tape:
            logits = model(xb, training=True)
            per_example = loss_fn(yb, logits)
            # Divided by the global batch, not this replica's: the optimizer sums the
            # gradients of all replicas, so the sum is the global mean's gradient.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), yb), tf.float32))
        count = tf.cast(tf.shape(yb)[0], tf.float32)
        return tf.reduce_sum(per_example), correct, count

    per_replica = strategy.run(step_fn, args=next(iterator))
    # Sums over all workers (a collective): every worker gets the same global numbers.
    return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica]


log(f"training {EPOCHS} epochs x {STEPS_PER_EPOCH} steps, {BATCH_PER_WORKER} per worker per step")
loss = acc = float("nan")
for epoch in range(1, EPOCHS + 1):
    te = time.time()
    loss_sum = correct = count = 0.0
    for _ in range(STEPS_PER_EPOCH):
        s, c, n = train_step(iterator)
        loss_sum, correct, count = loss_sum + s, correct + c, count + n
    # Like fit's history: the epoch's mean over its batches, taken before each update.
    loss, acc = float(loss_sum / count), float(correct / count)
    log(f"epoch {epoch}/{EPOCHS}: loss {loss:.4f} accuracy {acc:.4f} ({time.time() - te:.1f} s)")

log(f"final loss {loss:.4f} accuracy {acc:.4f} after {EPOCHS * STEPS_PER_EPOCH} steps in {time.time() - t0:.1f} s")
# Exit 0 from every worker is the success signal; a worker that raised exits 1.
sys.exit(0)
