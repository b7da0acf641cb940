//! TrainingJobs for tests: `examples/quickstart.yaml` (or any manifest), with the names and
//! counts a test needs, so that every test starts from the job users start from and none
//! keeps a copy of its own. Behind the `fixtures` feature, which only dev-dependencies
//! turn on.

use crate::TrainingJob;

/// The quickstart example, as shipped.
pub const QUICKSTART_YAML: &str = include_str!("../../examples/quickstart.yaml");

/// A TrainingJob under construction.
#[derive(Debug, Clone)]
pub struct JobFixture(TrainingJob);

impl JobFixture {
    /// `examples/quickstart.yaml`: 1 PS and 2 workers on the built-in dataset.
    pub fn quickstart() -> Self {
        Self::from_yaml(QUICKSTART_YAML)
    }

    /// Any manifest; panics with the parse error, since a test's own YAML is wrong.
    pub fn from_yaml(yaml: &str) -> Self {
        Self(serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("test manifest: {e}")))
    }

    pub fn name(mut self, name: &str) -> Self {
        self.0.metadata.name = Some(name.to_string());
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.0.metadata.namespace = Some(namespace.to_string());
        self
    }

    /// What the API server gives a stored object.
    pub fn uid(mut self, uid: &str) -> Self {
        self.0.metadata.uid = Some(uid.to_string());
        self
    }

    pub fn generation(mut self, generation: i64) -> Self {
        self.0.metadata.generation = Some(generation);
        self
    }

    pub fn workers(mut self, replicas: i32) -> Self {
        self.0.spec.replica_specs.worker.replicas = replicas;
        self
    }

    /// Panics on a job without a PS spec (the quickstart has one).
    pub fn ps(mut self, replicas: i32) -> Self {
        self.0
            .spec
            .replica_specs
            .ps
            .as_mut()
            .expect("the fixture's job has a PS")
            .replicas = replicas;
        self
    }

    /// Any other change.
    pub fn with(mut self, change: impl FnOnce(&mut TrainingJob)) -> Self {
        change(&mut self.0);
        self
    }

    pub fn build(self) -> TrainingJob {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quickstart_fixture_is_the_shipped_example_with_what_was_asked() {
        let job = JobFixture::quickstart()
            .name("j")
            .namespace("ns")
            .uid("u")
            .generation(3)
            .ps(2)
            .workers(5)
            .build();
        let shipped: TrainingJob = serde_yaml::from_str(QUICKSTART_YAML).unwrap();
        assert_eq!(job.spec.training, shipped.spec.training);
        assert_eq!(
            (
                job.metadata.name.as_deref(),
                job.metadata.namespace.as_deref()
            ),
            (Some("j"), Some("ns"))
        );
        assert_eq!(
            (job.metadata.uid.as_deref(), job.metadata.generation),
            (Some("u"), Some(3))
        );
        assert_eq!(job.spec.replica_specs.ps.as_ref().unwrap().replicas, 2);
        assert_eq!(job.spec.replica_specs.worker.replicas, 5);
        assert!(job.spec.validate().is_ok());
    }
}
