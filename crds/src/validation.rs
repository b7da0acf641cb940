//! Spec rules beyond the CRD schema.
//!
//! The API server enforces the schema at admission, but two paths bypass it: rules that
//! span fields (a structural schema cannot say "pipeline only with ModelParallel", and the
//! 1.20-era servers we support have no CEL), and `kubetrain local`, which reads YAML with
//! no API server at all. So the schema's own bounds are checked here again, and the
//! operator and the local runner both report the result as the `InvalidSpec` condition.

use std::fmt;

use crate::spec::*;

/// One problem with a spec: the field, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// JSON path of the offending field, for example `spec.replicaSpecs.worker.replicas`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a spec, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<SpecError>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

/// The number of dense layers a model has: hidden layers plus the output layer.
pub fn layer_count(model: &ModelSpec) -> usize {
    match model.kind {
        ModelKind::Softmax => 1,
        ModelKind::Mlp => effective_hidden(model).len() + 1,
    }
}

/// Hidden widths with the documented default applied (`[128]` for an mlp without any).
pub fn effective_hidden(model: &ModelSpec) -> Vec<u32> {
    match model.kind {
        ModelKind::Softmax => Vec::new(),
        ModelKind::Mlp if model.hidden.is_empty() => vec![128],
        ModelKind::Mlp => model.hidden.clone(),
    }
}

impl TrainingJobSpec {
    /// Checks everything the schema says plus the rules that span fields.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, message: String| {
            errors.push(SpecError {
                field: field.to_string(),
                message,
            })
        };

        let ps = self.replica_specs.ps.as_ref();
        let ps_replicas = ps.map_or(0, |p| p.replicas);
        let workers = self.replica_specs.worker.replicas;
        if ps_replicas < 0 {
            fail(
                "spec.replicaSpecs.ps.replicas",
                format!("must be 0 or more, got {ps_replicas}"),
            );
        }
        if workers < 1 {
            fail(
                "spec.replicaSpecs.worker.replicas",
                format!("must be at least 1, got {workers}"),
            );
        }
        let singles = [
            ("chief", self.replica_specs.chief.as_ref()),
            ("evaluator", self.replica_specs.evaluator.as_ref()),
        ];
        for (role, spec) in singles {
            let Some(spec) = spec else { continue };
            if !(0..=1).contains(&spec.replicas) {
                fail(
                    &format!("spec.replicaSpecs.{role}.replicas"),
                    format!("must be 0 or 1, got {}", spec.replicas),
                );
            }
            if self.training.is_some() && spec.replicas > 0 {
                fail(
                    &format!("spec.replicaSpecs.{role}"),
                    format!(
                        "the built-in trainer (spec.training) has no {role}: worker 0 is its chief \
                         and evaluates as it trains. Remove replicaSpecs.{role}, or remove \
                         spec.training and give every role a template that runs your own program"
                    ),
                );
            }
        }
        let roles = [
            ("chief", self.replica_specs.chief.as_ref()),
            ("ps", ps),
            ("worker", Some(&self.replica_specs.worker)),
            ("evaluator", self.replica_specs.evaluator.as_ref()),
        ];
        for (role, spec) in roles {
            let Some(spec) = spec else { continue };
            if let Some(template) = &spec.template {
                let containers = template.spec.as_ref().map_or(0, |s| s.containers.len());
                if containers == 0 {
                    fail(
                        &format!("spec.replicaSpecs.{role}.template.spec.containers"),
                        "the template has no containers; add one (the contract env goes into the container named `trainer`, else `tensorflow`, else the first), or remove the template to run the trainer image".into(),
                    );
                }
            } else if self.training.is_none() && spec.replicas > 0 {
                fail(
                    &format!("spec.replicaSpecs.{role}.template"),
                    "without spec.training the built-in trainer has nothing to train; add spec.training, or give this role a template that runs your own image".into(),
                );
            }
        }

        let policy = &self.run_policy;
        if policy.backoff_limit < 0 {
            fail(
                "spec.runPolicy.backoffLimit",
                format!("must be 0 or more, got {}", policy.backoff_limit),
            );
        }
        for (field, value, min) in [
            (
                "spec.runPolicy.activeDeadlineSeconds",
                policy.active_deadline_seconds,
                1,
            ),
            (
                "spec.runPolicy.startupDeadlineSeconds",
                policy.startup_deadline_seconds,
                1,
            ),
            (
                "spec.runPolicy.ttlSecondsAfterFinished",
                policy.ttl_seconds_after_finished,
                0,
            ),
        ] {
            if let Some(value) = value
                && value < min
            {
                fail(field, format!("must be at least {min}, got {value}"));
            }
        }
        if let Some(gang) = &policy.scheduling_policy
            && let Some(min) = gang.min_available
        {
            let total: i32 = roles
                .iter()
                .filter_map(|(_, spec)| spec.map(|s| s.replicas.max(0)))
                .sum();
            if min < 1 || min > total {
                fail(
                    "spec.runPolicy.schedulingPolicy.minAvailable",
                    format!("must be between 1 and the job's {total} replicas, got {min}"),
                );
            }
        }

        if let Some(training) = &self.training {
            check_training(training, self.mode, ps_replicas, workers, &mut fail);
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec(errors))
        }
    }
}

/// The `spec.training` rules alone, for a job of `mode` with `ps_replicas` parameter
/// servers and `workers` workers: what the built-in trainer checks at start-up, since it
/// reads its spec from the environment, past admission.
pub fn validate_training(
    training: &TrainingSpec,
    mode: Mode,
    ps_replicas: i32,
    workers: i32,
) -> Result<(), InvalidSpec> {
    let mut errors = Vec::new();
    check_training(
        training,
        mode,
        ps_replicas,
        workers,
        &mut |field, message| {
            errors.push(SpecError {
                field: field.to_string(),
                message,
            })
        },
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(errors))
    }
}

fn check_training(
    training: &TrainingSpec,
    mode: Mode,
    ps_replicas: i32,
    workers: i32,
    fail: &mut impl FnMut(&str, String),
) {
    if training.batch_size < 1 {
        fail(
            "spec.training.batchSize",
            "must be at least 1, got 0".into(),
        );
    }
    if training
        .log_dir
        .as_ref()
        .is_some_and(|d| d.trim().is_empty())
    {
        fail(
            "spec.training.logDir",
            "is empty; set the folder for TensorBoard events, or remove logDir".into(),
        );
    }
    if training.epochs < 1 {
        fail("spec.training.epochs", "must be at least 1, got 0".into());
    }

    let model = &training.model;
    if model.kind == ModelKind::Softmax && !model.hidden.is_empty() {
        fail(
            "spec.training.model.hidden",
            "a softmax model has no hidden layers; remove `hidden` or use `kind: mlp`".into(),
        );
    }
    if model.hidden.contains(&0) {
        fail(
            "spec.training.model.hidden",
            "every hidden layer needs a width of at least 1".into(),
        );
    }

    validate_dataset(&training.dataset, fail);
    validate_optimizer(&training.optimizer, fail);

    let consistency = &training.consistency;
    match (consistency.kind, consistency.staleness) {
            (ConsistencyKind::BoundedStaleness, None) => fail(
                "spec.training.consistency.staleness",
                "BoundedStaleness needs `staleness`: how many steps the fastest worker may run ahead (for example 2)".into(),
            ),
            (ConsistencyKind::Sync | ConsistencyKind::Async, Some(_)) => fail(
                "spec.training.consistency.staleness",
                format!(
                    "`staleness` only applies to kind BoundedStaleness, not {:?}; remove it or change the kind",
                    consistency.kind
                ),
            ),
            _ => {}
        }
    if consistency.stale_gradients.is_some() && consistency.kind == ConsistencyKind::Sync {
        fail(
            "spec.training.consistency.staleGradients",
            "Sync never applies a stale gradient; remove staleGradients or set kind: Async or BoundedStaleness".into(),
        );
    }
    if let Some(grace) = consistency.worker_grace_period_seconds {
        if consistency.kind != ConsistencyKind::Sync {
            fail(
                "spec.training.consistency.workerGracePeriodSeconds",
                format!(
                    "only Sync waits for a lost worker; {:?} goes on without it. Remove workerGracePeriodSeconds or set kind: Sync",
                    consistency.kind
                ),
            );
        } else if !(1..=86_400).contains(&grace) {
            fail(
                "spec.training.consistency.workerGracePeriodSeconds",
                format!("must be between 1 and 86400 seconds, got {grace}"),
            );
        }
    }

    match mode {
        Mode::DataParallel => {
            if ps_replicas == 0 {
                fail(
                        "spec.replicaSpecs.ps.replicas",
                        "a DataParallel job needs at least 1 parameter server to hold the parameters; set replicaSpecs.ps.replicas to 1 or more".into(),
                    );
            }
            if training.pipeline.is_some() {
                fail(
                        "spec.training.pipeline",
                        "`pipeline` only applies to mode ModelParallel; remove it or set spec.mode: ModelParallel".into(),
                    );
            }
        }
        Mode::ModelParallel => {
            if workers < 2 {
                fail(
                    "spec.replicaSpecs.worker.replicas",
                    format!(
                        "a ModelParallel job runs one pipeline stage per worker and needs at least 2 workers, got {workers}; add workers or use mode DataParallel"
                    ),
                );
            }
            let layers = layer_count(model);
            if workers > 0 && (workers as usize) > layers {
                fail(
                    "spec.replicaSpecs.worker.replicas",
                    format!(
                        "{workers} workers means {workers} pipeline stages, but the model has only {layers} layer(s); use at most {layers} workers or add hidden layers to spec.training.model.hidden"
                    ),
                );
            }
            if consistency.kind != ConsistencyKind::Sync {
                fail(
                        "spec.training.consistency.kind",
                        "a ModelParallel pipeline always updates synchronously; remove `consistency` or set kind: Sync".into(),
                    );
            }
            if let Some(pipeline) = &training.pipeline
                && pipeline.micro_batches > training.batch_size
            {
                fail(
                    "spec.training.pipeline.microBatches",
                    format!(
                        "{} micro-batches cannot be cut from a batch of {}; lower microBatches or raise batchSize",
                        pipeline.micro_batches, training.batch_size
                    ),
                );
            }
        }
    }
}

fn validate_dataset(dataset: &DatasetSpec, fail: &mut impl FnMut(&str, String)) {
    match (dataset.builtin, &dataset.path, dataset.format) {
            (Some(_), _, Some(_)) => fail(
                "spec.training.dataset.format",
                "`format` applies to your own files only; remove it or remove `builtin`".into(),
            ),
            (Some(BuiltinDataset::Digits), Some(_), _) => fail(
                "spec.training.dataset.path",
                "the digits dataset ships with the trainer and takes no path; remove `path`".into(),
            ),
            (None, None, _) => fail(
                "spec.training.dataset",
                "name a dataset: `builtin: digits`, `builtin: fashion-mnist`, or `path` with `format: csv`".into(),
            ),
            (None, Some(_), None) => fail(
                "spec.training.dataset.format",
                "a `path` needs a `format` (csv)".into(),
            ),
            _ => {}
        }
    if dataset.label_column.is_some() && dataset.format != Some(DataFormat::Csv) {
        fail(
            "spec.training.dataset.labelColumn",
            "`labelColumn` applies to csv files only; remove it".into(),
        );
    }
    if let Some(fraction) = dataset.test_fraction
        && !(0.0..=0.9).contains(&fraction)
    {
        fail(
            "spec.training.dataset.testFraction",
            format!("must be between 0 and 0.9, got {fraction}"),
        );
    }
}

fn validate_optimizer(optimizer: &OptimizerSpec, fail: &mut impl FnMut(&str, String)) {
    if optimizer.learning_rate.is_nan() || optimizer.learning_rate <= 0.0 {
        fail(
            "spec.training.optimizer.learningRate",
            format!("must be greater than 0, got {}", optimizer.learning_rate),
        );
    }
    let unit_interval = |v: f64| (0.0..1.0).contains(&v);
    for (field, value) in [
        ("momentum", optimizer.momentum),
        ("beta1", optimizer.beta1),
        ("beta2", optimizer.beta2),
    ] {
        if let Some(v) = value
            && !unit_interval(v)
        {
            fail(
                &format!("spec.training.optimizer.{field}"),
                format!("must be in [0, 1), got {v}"),
            );
        }
    }
    if let Some(eps) = optimizer.epsilon
        && eps.is_nan() | (eps <= 0.0)
    {
        fail(
            "spec.training.optimizer.epsilon",
            format!("must be greater than 0, got {eps}"),
        );
    }
    match optimizer.kind {
        OptimizerKind::Sgd => {
            for (field, value) in [
                ("beta1", optimizer.beta1),
                ("beta2", optimizer.beta2),
                ("epsilon", optimizer.epsilon),
            ] {
                if value.is_some() {
                    fail(
                        &format!("spec.training.optimizer.{field}"),
                        format!("`{field}` is an adam setting; remove it or use kind: adam"),
                    );
                }
            }
        }
        OptimizerKind::Adam => {
            if optimizer.momentum.is_some() {
                fail(
                    "spec.training.optimizer.momentum",
                    "`momentum` is an sgd setting (adam uses beta1); remove it or use kind: sgd"
                        .into(),
                );
            }
        }
    }
}
