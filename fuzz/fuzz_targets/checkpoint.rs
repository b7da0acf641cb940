//! The shard checkpoint parser (`checkpoint::read` without the file read), on what a disk
//! could hold: raw bytes, bytes under a valid checksum (so the fuzzer gets past it), and
//! real checkpoints with bytes changed and the checksum recomputed or not.
//!
//! Checked, beyond "no panic" and no allocation past the file's size: what is accepted is
//! a consistent shard (one value per parameter in every vector), and it re-encodes to a
//! file that parses back to it.
#![no_main]

use arbitrary::Arbitrary;
use kubetrain_trainer::checkpoint::ShardCheckpoint;
use kubetrain_trainer::model::OptimizerState;
use kubetrain_trainer::ps::fuzzing::{decode_checkpoint, encode_checkpoint};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    /// The bytes before the checksum; the right checksum is appended.
    Sealed(Vec<u8>),
    /// A real checkpoint, then damaged.
    Written {
        version: u64,
        start: u16,
        total_params: u64,
        adam: Option<u64>,
        params: Vec<f32>,
        /// A header `end` of its own, instead of the one the parameters give.
        end: Option<u64>,
        flips: Vec<(u16, u8)>,
        reseal: bool,
    },
}

/// The checksum `checkpoint::write` puts last (FNV-1a, 64 bits).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = fnv1a(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    body
}

fn written(
    version: u64,
    start: u16,
    total_params: u64,
    adam: Option<u64>,
    params: Vec<f32>,
) -> ShardCheckpoint {
    let len = params.len();
    let state = |k: f32| params.iter().map(|p| p * k).collect::<Vec<_>>();
    let optimizer = match adam {
        Some(t) => OptimizerState::Adam {
            m: state(0.5),
            v: state(0.25),
            t,
        },
        None => OptimizerState::Sgd {
            velocity: state(2.0),
        },
    };
    ShardCheckpoint {
        version,
        start: usize::from(start),
        end: usize::from(start) + len,
        total_params: total_params as usize,
        params,
        optimizer,
    }
}

/// Compares bit for bit: a NaN parameter is a value like any other here.
fn same(a: &ShardCheckpoint, b: &ShardCheckpoint) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let vectors = |c: &ShardCheckpoint| {
        (
            c.optimizer.step(),
            c.optimizer
                .vectors()
                .into_iter()
                .map(bits)
                .collect::<Vec<_>>(),
        )
    };
    (a.version, a.start, a.end, a.total_params) == (b.version, b.start, b.end, b.total_params)
        && bits(&a.params) == bits(&b.params)
        && std::mem::discriminant(&a.optimizer) == std::mem::discriminant(&b.optimizer)
        && vectors(a) == vectors(b)
}

fn check(bytes: &[u8]) -> Option<ShardCheckpoint> {
    let ckpt = decode_checkpoint(bytes).ok()?;
    let len = ckpt
        .end
        .checked_sub(ckpt.start)
        .expect("an inverted range passed");
    assert_eq!(
        ckpt.params.len(),
        len,
        "parameters of another length than the range"
    );
    for v in ckpt.optimizer.vectors() {
        assert_eq!(
            v.len(),
            len,
            "optimizer state of another length than the range"
        );
    }
    // Nothing beyond the file's own values was allocated.
    assert!(4 * len * (1 + ckpt.optimizer.vectors().len()) < bytes.len());
    let again = encode_checkpoint(&ckpt);
    let back = decode_checkpoint(&again).expect("a re-encoded checkpoint does not parse");
    assert!(same(&back, &ckpt), "re-encoding changed the checkpoint");
    Some(ckpt)
}

fuzz_target!(|input: Input| {
    match input {
        Input::Raw(bytes) => {
            check(&bytes);
        }
        Input::Sealed(body) => {
            check(&seal(body));
        }
        Input::Written {
            version,
            start,
            total_params,
            adam,
            params,
            end,
            flips,
            reseal,
        } => {
            let mut ckpt = written(version, start, total_params, adam, params);
            let true_end = ckpt.end;
            if let Some(end) = end {
                ckpt.end = end as usize;
            }
            let mut bytes = encode_checkpoint(&ckpt);
            if ckpt.end != true_end {
                assert!(
                    check(&bytes).is_none(),
                    "a header of the wrong length passed"
                );
                return;
            }
            if flips.is_empty() {
                let back = check(&bytes).expect("a written checkpoint does not parse");
                assert!(same(&back, &ckpt), "a written checkpoint parses to another");
                return;
            }
            for (at, xor) in flips {
                let at = usize::from(at) % bytes.len();
                bytes[at] ^= xor;
            }
            if reseal {
                bytes.truncate(bytes.len() - 8);
                bytes = seal(bytes);
            }
            check(&bytes);
        }
    }
});
