//! The `TrainingJob` spec: what a user writes.
//!
//! Every doc comment here becomes the field's description in the CRD, so it is what
//! `kubectl explain trainingjob.spec...` shows. Write them for a new user: what the
//! field does, its default, and its allowed values.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::schema::preserve_unknown_object;
use crate::status::TrainingJobStatus;

/// One distributed training run: parameter-server and worker replicas, what to train, and
/// the policy that keeps the run alive.
// clippy reads the repeated `type_ = ...` inside separate printcolumn(...) groups as
// duplicated attributes; they are distinct columns.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubetrain.io",
    version = "v1alpha1",
    kind = "TrainingJob",
    plural = "trainingjobs",
    singular = "trainingjob",
    shortname = "tj",
    category = "kubetrain",
    namespaced,
    status = "TrainingJobStatus",
    derive = "PartialEq",
    doc = "A distributed training run. The kubetrain operator turns it into parameter-server and worker pods behind one headless Service, restarts what fails as runPolicy says, and reports conditions, per-role counts and live training progress in status.",
    printcolumn(
        name = "State",
        type_ = "string",
        description = "The job's current lifecycle state: the condition whose status is True",
        json_path = r#".status.conditions[?(@.status=="True")].type"#
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Workers ready / workers desired",
        json_path = ".status.workersReady"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        description = "Ready pods / desired pods of every role: chief, ps, worker, evaluator",
        json_path = ".status.replicasReady",
        priority = 1
    ),
    printcolumn(
        name = "Step",
        type_ = "integer",
        description = "Global training step reported by the chief",
        json_path = ".status.progress.step"
    ),
    printcolumn(
        name = "Loss",
        type_ = "number",
        description = "Latest training loss reported by the chief",
        json_path = ".status.progress.loss"
    ),
    printcolumn(
        name = "Accuracy",
        type_ = "number",
        description = "Latest test accuracy reported by the chief",
        json_path = ".status.progress.accuracy"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobSpec {
    /// How the work is split. `DataParallel` (default): every worker holds the whole model,
    /// trains on its own partition of the data, and exchanges gradients and parameters with
    /// the parameter servers. `ModelParallel`: the model's layers are cut into one stage per
    /// worker and micro-batches flow through the stages as a pipeline; no parameter servers.
    #[serde(default)]
    pub mode: Mode,

    /// The replicas to run, per role.
    pub replica_specs: ReplicaSpecs,

    /// What the built-in trainer trains: model, dataset, optimizer and consistency. Leave it
    /// out when the pod template runs an image of your own (for example a TensorFlow
    /// ParameterServerStrategy program reading TF_CONFIG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSpec>,

    /// When the job counts as succeeded, for jobs without a `chief` replica (with one, the
    /// chief exiting 0 decides). `ChiefWorker` (default): as soon as worker 0 exits 0.
    /// `AllWorkers`: once every worker has exited 0.
    #[serde(default)]
    pub success_policy: SuccessPolicy,

    /// Restarts, deadlines, clean-up, TTL, suspension and gang scheduling.
    #[serde(default)]
    pub run_policy: RunPolicy,
}

/// How the work is split across workers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Mode {
    /// Every worker holds the whole model and its own data partition; parameters live on the PS.
    #[default]
    DataParallel,
    /// The model's layers are split into one pipeline stage per worker.
    ModelParallel,
}

/// The replicas of each role.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSpecs {
    /// A coordinator of your own program, for example TensorFlow 2's ParameterServerStrategy
    /// client, which runs as task type `chief` while the `ps` and `worker` tasks only serve.
    /// 0 or 1 replica, pod `<job>-chief-0`. When a chief exists it alone decides success:
    /// the job succeeds when the chief exits 0, and the other pods are then removed as
    /// runPolicy.cleanPodPolicy says. Not with spec.training: the built-in trainer uses
    /// worker 0 as its chief.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "single_replica_spec")]
    pub chief: Option<ReplicaSpec>,

    /// Parameter servers. Each holds a contiguous shard of the flattened parameters and the
    /// optimizer state for it. Required (at least 1) for a DataParallel job with the built-in
    /// trainer; leave it out or set `replicas: 0` for ModelParallel. The chief tells the
    /// parameter servers to exit when training ends, and the operator removes PS pods when
    /// the job finishes (unless cleanPodPolicy is None).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ps: Option<ReplicaSpec>,

    /// Workers. Worker 0 is the chief: it evaluates, reports progress and decides when the
    /// job is done. In ModelParallel mode worker i runs pipeline stage i. At least 1.
    #[schemars(schema_with = "worker_replica_spec")]
    pub worker: ReplicaSpec,

    /// A side evaluator of your own program (TensorFlow task type `evaluator`): 0 or 1
    /// replica, pod `<job>-evaluator-0`. It is not part of the training cluster (its
    /// TF_CONFIG names only itself) and never decides success; if it is still running when
    /// the job finishes, it is stopped. Not with spec.training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "single_replica_spec")]
    pub evaluator: Option<ReplicaSpec>,
}

impl ReplicaSpecs {
    /// The spec of a role, if the job has that role.
    pub fn get(&self, role: crate::contract::Role) -> Option<&ReplicaSpec> {
        use crate::contract::Role;
        match role {
            Role::Chief => self.chief.as_ref(),
            Role::Ps => self.ps.as_ref(),
            Role::Worker => Some(&self.worker),
            Role::Evaluator => self.evaluator.as_ref(),
        }
    }

    /// The number of pods of a role (0 when the role is absent).
    pub fn replicas(&self, role: crate::contract::Role) -> usize {
        self.get(role).map_or(0, |s| s.replicas.max(0) as usize)
    }
}

/// How many pods of one role to run, what they run, and how failures are handled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSpec {
    /// Number of pods of this role. Default 1.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// What happens when a pod of this role fails. `Never`: the job fails. `OnFailure`
    /// (default) and `Always`: the pod is restarted in place and the restart is counted.
    /// `ExitCode`: exit codes 1-127 are permanent and fail the job; 128 and above (signals,
    /// OOM kill) are retried by recreating the pod. Restarts of every kind count against
    /// runPolicy.backoffLimit.
    #[serde(default)]
    pub restart_policy: RestartPolicy,

    /// The pod to run, as in a Deployment. Optional: without it the pod runs the operator's
    /// trainer image (`--trainer-image`). With it, your template is kept as written
    /// (resources, volumes, sidecars, node selectors); the operator adds the pod contract
    /// environment (KUBETRAIN_*, TF_CONFIG) and the `kubetrain` port to the container named
    /// `trainer`, else `tensorflow`, else the first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    // Boxed: a PodSpec is kilobytes, and a spec with four roles deserialised inline
    // overflowed a 2 MiB thread stack in debug builds.
    pub template: Option<Box<PodTemplateSpec>>,
}

fn default_replicas() -> i32 {
    1
}

/// How failed pods of a role are handled.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartPolicy {
    /// A failed pod fails the job.
    Never,
    /// The pod is restarted in place when it fails.
    #[default]
    OnFailure,
    /// The pod is restarted in place whenever it exits.
    Always,
    /// Exit codes 1-127 fail the job; 128 and above (signals, OOM kill) recreate the pod.
    ExitCode,
}

/// When the job counts as succeeded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SuccessPolicy {
    /// The job succeeds when worker 0 (the chief) exits 0.
    #[default]
    ChiefWorker,
    /// The job succeeds when every worker has exited 0.
    AllWorkers,
}

/// What the built-in trainer trains.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingSpec {
    /// The model to train.
    pub model: ModelSpec,

    /// Where the training data comes from.
    pub dataset: DatasetSpec,

    /// The optimizer the parameter servers (or pipeline stages) apply to the gradients.
    pub optimizer: OptimizerSpec,

    /// Examples per worker per step. In ModelParallel mode, the whole batch that is cut into
    /// micro-batches. Default 64, at least 1.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1))]
    pub batch_size: u32,

    /// Passes over each worker's partition of the training data. Default 10, at least 1.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1))]
    pub epochs: u32,

    /// Seed for parameter initialisation, the train/test split and per-epoch shuffling. Runs
    /// with the same seed and spec compute the same thing. Default 42.
    #[serde(default = "default_seed")]
    #[schemars(range(min = 0))]
    pub seed: u64,

    /// How workers synchronise with the parameter servers (DataParallel only). Default `Sync`.
    #[serde(default)]
    pub consistency: ConsistencySpec,

    /// Periodic checkpoints of parameters and optimizer state, so a restarted parameter
    /// server (or pipeline stage) resumes instead of starting over. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointSpec>,

    /// Micro-batching for ModelParallel jobs. Only valid with `mode: ModelParallel`, where it
    /// defaults to 4 micro-batches with the 1F1B schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineSpec>,

    /// Folder for TensorBoard event files (`tensorboard --logdir` on it shows the curves).
    /// Each trainer process writes a run of its own: `worker-0` (the chief) the train
    /// loss, samples/s, test accuracy and test loss; `ps-<i>` the Async staleness;
    /// `worker-<k>` a pipeline stage's busy and idle time. In a cluster, mount a volume
    /// that every pod of the job can write (a ReadWriteMany PVC) at this path; a folder
    /// that cannot be written fails the pod at start. `kubetrain local` sets it to the run
    /// directory when unset. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub log_dir: Option<String>,
}

fn default_batch_size() -> u32 {
    64
}
fn default_epochs() -> u32 {
    10
}
fn default_seed() -> u64 {
    42
}

/// The model architecture.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// `softmax` (multinomial logistic regression) or `mlp` (ReLU hidden layers, softmax
    /// output).
    pub kind: ModelKind,

    /// Widths of the hidden layers, input side first (mlp only). Default `[128]` for mlp.
    /// Each width is at least 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1)))]
    pub hidden: Vec<u32>,
}

/// Model architectures of the built-in trainer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Multinomial logistic regression: one dense layer and softmax.
    Softmax,
    /// Multi-layer perceptron with ReLU hidden layers and a softmax output.
    Mlp,
}

/// Where the training data comes from: a built-in dataset, or a file of your own.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// A dataset that needs no download configuration: `digits` (8x8 UCI handwritten
    /// digits, shipped inside the trainer) or `fashion-mnist` (read from Debian's
    /// `dataset-fashion-mnist` package, or from `path`). Set either this or `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinDataset>,

    /// With `format: csv`, the CSV file to read (for example on a mounted volume). With
    /// `builtin: fashion-mnist`, the directory holding the gzipped IDX files (default
    /// /usr/share/datasets/fashion-mnist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,

    /// File format for `path` when no builtin is set. Only `csv` today: one example per row,
    /// numeric feature columns and an integer class label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,

    /// CSV only: the header name of the label column. Default `label`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,

    /// Share of the examples held out as the test split when the dataset has no test split
    /// of its own (digits, csv). Default 0.2; between 0 and 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub test_fraction: Option<f64>,
}

// Datasets the trainer knows by name. (A `//` comment: a doc comment on an enum used
// through `Option` would replace the field's own description in the schema.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BuiltinDataset {
    /// UCI ML hand-written digits, 1,797 8x8 images, 10 classes. Ships with the trainer.
    Digits,
    /// Zalando's Fashion-MNIST, 70,000 28x28 images, 10 classes. Needs Debian's
    /// `dataset-fashion-mnist` package (or the IDX files at `path`).
    FashionMnist,
}

// File formats the trainer reads (see the note on BuiltinDataset).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Comma-separated values with a header row.
    Csv,
}

/// The optimizer applied to the gradients.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OptimizerSpec {
    /// `sgd` (with optional momentum) or `adam`.
    pub kind: OptimizerKind,

    /// Step size. Must be greater than 0. Default 0.1.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 0.0), extend("exclusiveMinimum" = true))]
    pub learning_rate: f64,

    /// sgd only: momentum coefficient in [0, 1). Default 0 (plain SGD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0), extend("maximum" = 1.0, "exclusiveMaximum" = true))]
    pub momentum: Option<f64>,

    /// adam only: decay of the first-moment estimate, in [0, 1). Default 0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0), extend("maximum" = 1.0, "exclusiveMaximum" = true))]
    pub beta1: Option<f64>,

    /// adam only: decay of the second-moment estimate, in [0, 1). Default 0.999.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0), extend("maximum" = 1.0, "exclusiveMaximum" = true))]
    pub beta2: Option<f64>,

    /// adam only: term added to the denominator for numerical stability. Default 1e-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0), extend("exclusiveMinimum" = true))]
    pub epsilon: Option<f64>,
}

fn default_learning_rate() -> f64 {
    0.1
}

/// Optimizers of the built-in trainer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent, with optional momentum.
    Sgd,
    /// Adam (Kingma & Ba).
    Adam,
}

/// How workers synchronise with the parameter servers.
///
/// Kept as a unit-only `kind` plus an optional `staleness` rather than an internally
/// tagged enum: the latter does not produce a structural schema.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencySpec {
    /// `Sync` (default): every step aggregates all workers' gradients in rank order, then
    /// applies them; deterministic. `Async`: updates are applied as they arrive.
    /// `BoundedStaleness`: like Async, but no worker runs more than `staleness` steps ahead
    /// of the slowest.
    #[serde(default)]
    pub kind: ConsistencyKind,

    /// BoundedStaleness only: how many steps the fastest worker may run ahead of the
    /// slowest. At least 0 (0 behaves like lock-step). Required with BoundedStaleness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub staleness: Option<u32>,

    /// Sync only: how long the parameter servers hold the step for a worker whose
    /// heartbeats stopped, so that a replacement pod (deleted, preempted, drained, or
    /// recreated on another node) can register again and training continues from the same
    /// step. Only past this does the job fail, naming the worker. Default 120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub worker_grace_period_seconds: Option<u32>,

    /// Async and BoundedStaleness only: what the parameter servers do with a gradient
    /// that other workers' updates overtook while it was computed. Default
    /// `CorrectMomentum`, which converges at the learning rate and momentum tuned for Sync;
    /// `Apply` is TensorFlow's parameter-server behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_gradients: Option<StaleGradients>,
}

impl ConsistencySpec {
    /// The default grace covers a pod being rescheduled and its image pulled on a new node.
    pub const DEFAULT_WORKER_GRACE_PERIOD_SECONDS: u32 = 120;

    /// Sync: how long a silent worker may be away before the job fails.
    pub fn worker_grace_period(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(
            self.worker_grace_period_seconds
                .unwrap_or(Self::DEFAULT_WORKER_GRACE_PERIOD_SECONDS),
        ))
    }
}

/// Consistency models between workers and parameter servers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConsistencyKind {
    /// Lock-step: aggregate every worker's gradient, then apply.
    #[default]
    Sync,
    /// Apply each worker's gradient on arrival.
    Async,
    /// Async, but the fastest worker waits when it is `staleness` steps ahead of the slowest.
    BoundedStaleness,
}

/// Async and BoundedStaleness only: how the parameter servers apply a stale gradient, one
/// computed against parameters `τ` updates older than the ones they now hold. Asynchrony
/// acts as momentum of its own (Mitliagkas et al. 2016); on top of the momentum tuned for
/// Sync, the run oscillates instead of converging. `CorrectMomentum` (default) lowers the
/// explicit momentum (SGD's, Adam's β1) by what asynchrony adds; `ScaleLearningRate`
/// divides the learning rate by `1 + τ`; `Apply` applies it as if fresh, as TensorFlow's
/// parameter servers do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StaleGradients {
    /// The explicit momentum gives up what asynchrony adds, `τ̄ / (1 + τ̄)` for the recent
    /// updates' mean staleness `τ̄`: `μ' = max(0, μ - τ̄ / (1 + τ̄))` (the total being about
    /// the sum, as YellowFin's momentum control takes it); Adam's β1 likewise. Without
    /// momentum there is nothing to give up, and updates are applied as they are.
    #[default]
    CorrectMomentum,
    /// The update's learning rate is divided by `1 + τ` (staleness-aware async SGD, Zhang
    /// et al. 2016).
    ScaleLearningRate,
    /// Applied as if fresh, as TensorFlow's parameter servers do.
    Apply,
}

/// Periodic checkpoints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Directory for checkpoint files, one file per parameter server shard or pipeline
    /// stage. Mount a volume here so checkpoints outlive the pod.
    pub path: String,

    /// Write a checkpoint every this many steps. Default 200, at least 1.
    #[serde(default = "default_every_steps")]
    #[schemars(range(min = 1))]
    pub every_steps: u32,
}

fn default_every_steps() -> u32 {
    200
}

/// Micro-batching of a ModelParallel pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineSpec {
    /// Number of micro-batches each batch is cut into. More micro-batches keep the stages
    /// busier (less pipeline bubble). Default 4, at least 1.
    #[serde(default = "default_micro_batches")]
    #[schemars(range(min = 1))]
    pub micro_batches: u32,

    /// Order of forward and backward passes. `1F1B` (default): each stage alternates one
    /// forward and one backward, so at most K micro-batches are in flight per stage.
    /// `GPipe`: all forwards, then all backwards, then one update.
    #[serde(default)]
    pub schedule: PipelineSchedule,
}

fn default_micro_batches() -> u32 {
    4
}

/// Pipeline schedules.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PipelineSchedule {
    /// One forward, one backward: bounded activation memory.
    #[default]
    #[serde(rename = "1F1B")]
    OneForwardOneBackward,
    /// All forwards, then all backwards, then a synchronous update.
    GPipe,
}

/// Restarts, deadlines, clean-up, TTL, suspension and gang scheduling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Total pod restarts (in place or by recreation, all roles together) allowed before the
    /// job fails with reason BackoffLimitExceeded. Default 3, at least 0.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0))]
    pub backoff_limit: i32,

    /// Seconds the job may run, counted from startTime, before it fails with reason
    /// DeadlineExceeded and its pods are removed as cleanPodPolicy says. No limit when
    /// absent; at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds a pod may stay Pending (image pull errors, unschedulable, bad config) before
    /// the job fails with reason StartupDeadlineExceeded. No limit when absent; at least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub startup_deadline_seconds: Option<i64>,

    /// Seconds after the job finishes (Succeeded or Failed) before the operator deletes the
    /// TrainingJob itself. Kept forever when absent; 0 deletes it right away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Which pods to delete when the job finishes. `Running` (default): pods still running
    /// (always including the parameter servers); finished pods stay for their logs. `All`:
    /// every pod. `None`: keep them all. The Service goes when the pods go.
    #[serde(default)]
    pub clean_pod_policy: CleanPodPolicy,

    /// `true` deletes the job's pods and keeps the job (condition Suspended). Setting it back
    /// to `false` recreates the pods and restarts the active deadline. Default false.
    #[serde(default)]
    pub suspend: bool,

    /// Gang scheduling: start all pods together or none. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling_policy: Option<SchedulingPolicy>,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: None,
            startup_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            clean_pod_policy: CleanPodPolicy::default(),
            suspend: false,
            scheduling_policy: None,
        }
    }
}

fn default_backoff_limit() -> i32 {
    3
}

/// Which pods to delete when the job finishes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CleanPodPolicy {
    /// Delete pods still running; keep finished ones for their logs.
    #[default]
    Running,
    /// Delete every pod.
    All,
    /// Keep every pod.
    None,
}

/// Gang scheduling through a PodGroup (Volcano or scheduler-plugins).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingPolicy {
    /// Create a PodGroup and ask the gang scheduler to place all pods together. Default false.
    #[serde(default)]
    pub gang: bool,

    /// Pods that must be placeable at once before any starts. Default: all replicas. At
    /// least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_available: Option<i32>,

    /// Scheduler queue for the PodGroup (Volcano queue name). Scheduler default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,

    /// PriorityClass for the PodGroup and its pods. Cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class: Option<String>,
}

/// Workers share `ReplicaSpec` with the parameter servers but need at least one replica.
fn worker_replica_spec(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = ReplicaSpec::json_schema(generator);
    if let Some(replicas) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("replicas"))
        .and_then(|r| r.as_object_mut())
    {
        replicas.insert("minimum".into(), 1.into());
        replicas.insert(
            "description".into(),
            "Number of worker pods. Default 1, at least 1.".into(),
        );
    }
    schema
}

/// The chief and the evaluator are single replicas, as in Kubeflow's TFJob: TensorFlow
/// knows one coordinator and one side evaluator per cluster.
fn single_replica_spec(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = ReplicaSpec::json_schema(generator);
    if let Some(replicas) = schema
        .get_mut("properties")
        .and_then(|p| p.get_mut("replicas"))
        .and_then(|r| r.as_object_mut())
    {
        replicas.insert("maximum".into(), 1.into());
        replicas.insert(
            "description".into(),
            "Number of pods of this role: 0 or 1. Default 1.".into(),
        );
    }
    schema
}
