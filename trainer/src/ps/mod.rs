//! Parameter servers: sharding of the flat parameter vector, the consistency rules that
//! decide when a gradient is applied and when a worker may pull, checkpoints, and the gRPC
//! service around them.

mod registration;
mod server;
mod shard;
#[cfg(test)]
mod shard_props;
pub mod staleness;

use std::ops::Range;

pub use server::run_ps;
pub use shard::{PullDecision, PushOutcome, Shard, ShardError};

/// The PS's pure parts that the fuzz targets in `fuzz/` drive and that stay private to
/// the crate otherwise. Not an API: nothing outside `fuzz/` may depend on it.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::registration::{ExpectedModel, MAX_PARAMS, RefusedModel, check};

    use crate::checkpoint::ShardCheckpoint;

    /// [`crate::checkpoint::read`] without the file: the bytes of a checkpoint parsed.
    pub fn decode_checkpoint(bytes: &[u8]) -> Result<ShardCheckpoint, String> {
        crate::checkpoint::decode(bytes)
    }

    /// The bytes [`crate::checkpoint::write`] puts in the file.
    pub fn encode_checkpoint(ckpt: &ShardCheckpoint) -> Vec<u8> {
        crate::checkpoint::encode(ckpt)
    }
}

/// Cuts `total` parameters into `servers` contiguous ranges whose sizes differ by at most
/// one, so the largest shard is within `1 + servers/total` of the mean. Equal cuts of the
/// flat key space ignore layer boundaries on purpose: a big layer would otherwise leave one
/// server with most of the traffic.
pub fn shard_ranges(total: usize, servers: usize) -> Vec<Range<usize>> {
    let servers = servers.max(1);
    let (base, extra) = (total / servers, total % servers);
    let mut start = 0;
    (0..servers)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Network;

    #[test]
    fn every_example_model_shards_evenly() {
        // The models in examples/ (digits 64 inputs, fashion-mnist 784), plus softmax.
        let models = [
            Network::new(64, &[64], 10),
            Network::new(64, &[128, 64], 10),
            Network::new(64, &[128], 10),
            Network::new(64, &[], 10),
            Network::new(784, &[256], 10),
            Network::new(784, &[], 10),
        ];
        for net in &models {
            for servers in 1..=8 {
                let ranges = shard_ranges(net.num_params(), servers);
                assert_eq!(ranges.len(), servers);
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[servers - 1].end, net.num_params());
                assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
                let max = ranges.iter().map(|r| r.len()).max().unwrap() as f64;
                let mean = net.num_params() as f64 / servers as f64;
                assert!(
                    max / mean <= 1.1,
                    "{:?} over {servers}: {max} vs {mean}",
                    net.widths()
                );
            }
        }
    }
}
