//! What the next step runs: a pure function of the sequences' phases.
//!
//! Every decoding sequence gets its next token in every step, so answers in
//! flight never wait for more than one step. Prompts are prefilled in
//! chunks, oldest admission first, and a step carries at most
//! `prefill_chunk` prompt tokens in all, so a long prompt delays the
//! running answers by at most one chunk's work per step. A prompt chunk
//! that does not fit in what is left of the step waits for the next step
//! rather than being cut down: each sequence's chunk boundaries depend only
//! on its own prompt, never on who else is in the batch.

/// Where a sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its prompt is not all in the cache yet; `next_chunk` tokens go next.
    Prefilling { next_chunk: usize },
    /// It has a sampled token to feed back.
    Decoding,
}

/// What one sequence does in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Decode,
    Prefill(usize),
}

/// The step for `phases` (in admission order): `(index, work)` pairs, in
/// index order.
pub fn plan(phases: &[Phase], prefill_chunk: usize) -> Vec<(usize, Work)> {
    let mut left = prefill_chunk;
    let mut prefill_open = true;
    let mut work = Vec::with_capacity(phases.len());
    for (index, phase) in phases.iter().enumerate() {
        match *phase {
            Phase::Decoding => work.push((index, Work::Decode)),
            Phase::Prefilling { next_chunk } if prefill_open => {
                // A chunk is never larger than `prefill_chunk` (see
                // `next_chunk`), so the oldest prompt always goes.
                if next_chunk <= left {
                    left = left.saturating_sub(next_chunk);
                    work.push((index, Work::Prefill(next_chunk)));
                } else {
                    // Oldest first: a later, smaller chunk does not jump the queue.
                    prefill_open = false;
                }
            }
            Phase::Prefilling { .. } => {}
        }
    }
    work
}

/// The next chunk of a prompt of `prompt_len` tokens with `cached` of them
/// in the cache: at most `prefill_chunk` tokens, and ending exactly at
/// `shared_prefix` when the cache has not reached it (so that prefix can be
/// kept for other sequences).
pub fn next_chunk(
    cached: usize,
    prompt_len: usize,
    shared_prefix: usize,
    prefill_chunk: usize,
) -> usize {
    let end = if cached < shared_prefix {
        shared_prefix
    } else {
        prompt_len
    };
    (end - cached).min(prefill_chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    #[test]
    fn every_decoding_sequence_steps_and_prompts_share_one_chunk() {
        let phases = [
            Decoding,
            Prefilling { next_chunk: 300 },
            Decoding,
            Prefilling { next_chunk: 200 },
            Prefilling { next_chunk: 100 },
        ];
        assert_eq!(
            plan(&phases, 512),
            [
                (0, Work::Decode),
                (1, Work::Prefill(300)),
                (2, Work::Decode),
                (3, Work::Prefill(200))
            ]
        );
    }

    #[test]
    fn a_later_small_chunk_does_not_jump_an_older_one() {
        let phases = [
            Prefilling { next_chunk: 400 },
            Prefilling { next_chunk: 200 },
            Prefilling { next_chunk: 50 },
        ];
        assert_eq!(plan(&phases, 512), [(0, Work::Prefill(400))]);
    }

    #[test]
    fn chunks_stop_at_the_shared_prefix_and_at_the_chunk_size() {
        assert_eq!(next_chunk(0, 1000, 40, 512), 40);
        assert_eq!(next_chunk(40, 1000, 40, 512), 512);
        assert_eq!(next_chunk(552, 1000, 40, 512), 448);
        assert_eq!(next_chunk(0, 30, 0, 512), 30);
        assert_eq!(next_chunk(0, 2000, 1000, 512), 512);
    }
}
