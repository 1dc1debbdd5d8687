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
        let mut state = mix(seed ^ 0x9e37_79b9_7f4a_7c15);
        for &s in stream {
            state = mix(state ^ s.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        }
        Rng { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// Uniform in [0, 1), with 24 bits: every value is an exact f32.
    pub fn next_f32(&mut self) -> f32 {
        unit_f32(self.next_u64())
    }

    /// The value [`Rng::next_f32`] returns after `index` other draws, without drawing them:
    /// SplitMix64's state only counts, so draw i of a stream is one mix of state + (i+1)·γ.
    /// Counter-based draws for many elements at once, in any order, on any thread.
    pub fn nth_f32(&self, index: u64) -> f32 {
        unit_f32(mix(self.state.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15))))
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

/// 24 bits of `bits` as a float in [0, 1).
fn unit_f32(bits: u64) -> f32 {
    (bits >> 40) as f32 / (1u64 << 24) as f32
}

/// SplitMix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
            assert_eq!(stream.nth_f32(index).to_bits(), sequential.next_f32().to_bits(), "draw {index}");
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
