//! Deterministic randomness: SplitMix64, and counter-based draws.
//!
//! Every random number in cnnc derives from the model's `seed` and counters (parameter index,
//! epoch, step, node, element), never from hidden state: a run is reproducible bit for bit,
//! whatever the thread count, and a resumed run needs only the counters.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for initialization,
/// shuffling and dropout masks.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A stream identified by `seed` and any number of counters.
    pub fn new(seed: u64, stream: &[u64]) -> Self {
        let mut state = mix(seed ^ GAMMA);
        for &s in stream {
            state = mix(state ^ s.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        }
        Rng { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// Uniform in [0, 1), with 24 bits: every value is an exact f32.
    pub fn next_f32(&mut self) -> f32 {
        unit_f32(self.next_u64())
    }

    /// The value [`Rng::next_f32`] returns after `index` other draws, without drawing them:
    /// SplitMix64's state only counts, so draw i of a stream is one mix of state + (i+1)·γ.
    /// Counter-based draws for many elements at once, in any order, on any thread.
    #[inline]
    pub fn nth_f32(&self, index: u64) -> f32 {
        unit_f32(self.nth_u64(index))
    }

    /// The value [`Rng::next_u64`] returns after `index` other draws (see [`Rng::nth_f32`]).
    #[inline]
    pub fn nth_u64(&self, index: u64) -> u64 {
        mix(self.state.wrapping_add(index.wrapping_add(1).wrapping_mul(GAMMA)))
    }

    /// The counter draw `index` of the stream mixes: draw i is `mix(base + (i + 1)·GAMMA)` (a
    /// compiled kernel that draws in place computes exactly this, see [`MIX`]).
    pub fn base(&self) -> u64 {
        self.state
    }

    /// Whether draw `index` of [`Rng::nth_f32`] is at least `threshold` (see [`unit_threshold`]),
    /// decided on the integer bits: the same answer, without a conversion to float.
    #[inline]
    pub fn nth_at_least(&self, index: u64, threshold: u64) -> bool {
        self.nth_u64(index) >> 40 >= threshold
    }

    /// Uniform in [0, n), without modulo bias worth noticing for n far below 2^64.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// The integer k such that a draw of [`Rng::next_f32`] (k'/2^24 for its top 24 bits k') is at
/// least `p` exactly when k' ≥ k: ⌈p·2^24⌉, p in [0, 1].
pub fn unit_threshold(p: f32) -> u64 {
    (f64::from(p) * (1u64 << 24) as f64).ceil() as u64
}

/// 24 bits of `bits` as a float in [0, 1).
#[inline]
fn unit_f32(bits: u64) -> f32 {
    (bits >> 40) as f32 / (1u64 << 24) as f32
}

/// SplitMix64's increment.
pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's finalizer, as (shift, multiplier) rounds z = (z ^ z >> shift)·multiplier and
/// a last z ^ z >> 31: what [`mix`] computes, spelled out for kernels that compute it too.
pub const MIX: [(u32, u64); 2] = [(30, 0xbf58_476d_1ce4_e5b9), (27, 0x94d0_49bb_1331_11eb)];
pub const MIX_LAST_SHIFT: u32 = 31;

/// SplitMix64's finalizer.
#[inline]
fn mix(mut z: u64) -> u64 {
    for (shift, multiplier) in MIX {
        z = (z ^ (z >> shift)).wrapping_mul(multiplier);
    }
    z ^ (z >> MIX_LAST_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(42, &[1, 2]);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(42, &[1, 2]);
                move |_| r.next_u64()
            })
            .collect();
        let c = Rng::new(42, &[1, 3]).next_u64();
        assert_eq!(a, b);
        assert_ne!(a[0], c);
    }

    #[test]
    fn the_nth_draw_is_the_one_drawn_after_n_others() {
        let stream = Rng::new(11, &[5]);
        let mut sequential = stream.clone();
        for index in 0..1000 {
            let draw = sequential.next_f32();
            assert_eq!(stream.nth_f32(index).to_bits(), draw.to_bits(), "draw {index}");
            for p in [0.0, 0.3, 0.5, draw, f32::from_bits(draw.to_bits() + 1), 1.0] {
                assert_eq!(
                    stream.nth_at_least(index, unit_threshold(p)),
                    draw >= p,
                    "draw {index} against {p}"
                );
            }
        }
    }

    #[test]
    fn uniform_floats_cover_the_unit_interval() {
        let mut r = Rng::new(7, &[]);
        let xs: Vec<f32> = (0..10_000).map(|_| r.next_f32()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..100).collect();
        Rng::new(3, &[0]).shuffle(&mut v);
        assert_ne!(v, (0..100).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..100).collect::<Vec<_>>());
    }
}
