//! The memory a pass runs in: one allocation laid out by a [`Plan`], and the [`Scratch`] that
//! a step's kernels take their temporaries from.

use std::marker::PhantomData;

use ndarray::{ArrayViewD, ArrayViewMutD, IxDyn};

use super::reference::ops::Real;
use crate::autodiff::Program;
use crate::memory::{Buffer, Plan};

/// A plan and the memory it lays out, allocated once.
#[derive(Debug)]
pub struct Arena<T> {
    pub plan: Plan,
    /// The rayon thread count the plan's scratch was sized for (per-shard scratch).
    pub threads: usize,
    data: Vec<T>,
}

impl<T: Real> Arena<T> {
    pub fn new(plan: Plan, threads: usize) -> Self {
        let data = vec![T::zero(); plan.len];
        Arena { plan, threads, data }
    }

    /// Whether a batch of `n` fits this arena's plan, on the current thread count.
    pub fn fits(&self, n: usize) -> bool {
        n <= self.plan.batch && self.threads == rayon::current_num_threads()
    }

    /// The arena opened for one pass: buffers handed out by step.
    pub fn open<'a>(&'a mut self, program: &'a Program) -> Open<'a, T> {
        Open {
            plan: &self.plan,
            program,
            base: self.data.as_mut_ptr(),
            len: self.data.len(),
            _data: PhantomData,
        }
    }
}

/// An arena during a pass. Views of its buffers are taken by step: the arena checks that the
/// plan has the buffer live at that step, so a step can only see buffers that no other buffer
/// live at the same time shares memory with.
pub struct Open<'a, T> {
    plan: &'a Plan,
    program: &'a Program,
    base: *mut T,
    len: usize,
    _data: PhantomData<&'a mut [T]>,
}

impl<'a, T: Real> Open<'a, T> {
    pub fn plan(&self) -> &'a Plan {
        self.plan
    }

    /// `len` elements of `buffer` at step `t`, as a raw pointer.
    fn at(&self, buffer: Buffer, t: usize, len: usize) -> *mut T {
        let placed =
            self.plan.get(self.program, buffer).unwrap_or_else(|| panic!("the plan has no {buffer:?}"));
        assert!(
            placed.live[0] <= t && t <= placed.live[1],
            "step {t} touches {buffer:?}, which the plan has live over steps {:?}",
            placed.live
        );
        assert!(len <= placed.len, "{buffer:?} holds {} elements, not {len}", placed.len);
        assert!(placed.offset + placed.len <= self.len);
        // SAFETY: the offset lies inside the allocation (asserted above).
        unsafe { self.base.add(placed.offset) }
    }

    /// `buffer` at step `t`, viewed with `dims`.
    ///
    /// # Safety
    /// No mutable view of the same buffer may be alive. Views of different buffers live at the
    /// same step never overlap: the plan checks that when it is made.
    pub unsafe fn view(&self, buffer: Buffer, t: usize, dims: IxDyn) -> ArrayViewD<'a, T> {
        let len = ndarray::Dimension::size(&dims);
        let ptr = self.at(buffer, t, len);
        // SAFETY: `len` elements from `ptr` lie inside the buffer (checked by `at`); the caller
        // keeps mutable views of it away.
        unsafe { ArrayViewD::from_shape_ptr(dims, ptr) }
    }

    /// `buffer` at step `t`, viewed mutably with `dims`.
    ///
    /// # Safety
    /// No other view of the same buffer may be alive while this one is.
    pub unsafe fn view_mut(&self, buffer: Buffer, t: usize, dims: IxDyn) -> ArrayViewMutD<'a, T> {
        let len = ndarray::Dimension::size(&dims);
        let ptr = self.at(buffer, t, len);
        // SAFETY: as in `view`; the caller makes this the buffer's only view.
        unsafe { ArrayViewMutD::from_shape_ptr(dims, ptr) }
    }

    /// The scratch of step `t` (empty when the plan gives it none).
    ///
    /// # Safety
    /// At most one scratch of step `t` may be alive.
    pub unsafe fn scratch(&self, t: usize) -> Scratch<'a, T> {
        let Some(placed) = self.plan.get(self.program, Buffer::Scratch(t)) else {
            return Scratch::planned(&mut []);
        };
        let ptr = self.at(Buffer::Scratch(t), t, placed.len);
        // SAFETY: the buffer lies inside the allocation; the caller makes this its only view.
        Scratch::planned(unsafe { std::slice::from_raw_parts_mut(ptr, placed.len) })
    }
}

/// Elements a piece of `len` takes of a planned scratch: pieces start on 64-byte boundaries (as
/// the arena's buffers do), so that vector loads never straddle cache lines. A backend's
/// [`crate::backend::reference::Kernels::scratch`] counts its pieces with this.
pub fn piece(len: usize) -> usize {
    len.next_multiple_of(16)
}

/// Where a kernel takes the temporaries it needs (padded copies, packed weights, per-shard
/// tiles): the slice the memory plan gave its step, taken from the front; or, for a kernel
/// called outside a planned pass (the tests), fresh memory.
pub struct Scratch<'a, T> {
    free: &'a mut [T],
    heap: Option<&'a typed_arena::Arena<T>>,
}

impl<'a, T: Real> Scratch<'a, T> {
    /// The planned scratch of a step.
    pub fn planned(free: &'a mut [T]) -> Self {
        Scratch { free, heap: None }
    }

    /// Scratch that allocates from `heap` (for kernels called outside a planned pass).
    pub fn heap(heap: &'a typed_arena::Arena<T>) -> Self {
        Scratch { free: &mut [], heap: Some(heap) }
    }

    /// `len` elements whose contents are whatever an earlier step left there ([`piece`] of
    /// them taken from a planned scratch).
    pub fn take(&mut self, len: usize) -> &'a mut [T] {
        if piece(len) <= self.free.len() {
            let (taken, rest) = std::mem::take(&mut self.free).split_at_mut(piece(len));
            self.free = rest;
            return &mut taken[..len];
        }
        match self.heap {
            Some(heap) => heap.alloc_extend(std::iter::repeat_n(T::zero(), len)),
            None => panic!(
                "a kernel took {} elements of scratch where its step's plan had {} left: the backend's \
                 scratch count is wrong",
                piece(len),
                self.free.len()
            ),
        }
    }

    /// `len` elements set to zero.
    pub fn zeroed(&mut self, len: usize) -> &'a mut [T] {
        let taken = self.take(len);
        taken.fill(T::zero());
        taken
    }
}
