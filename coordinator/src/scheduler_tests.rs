//! Scheduler unit tests: admission, chunked prefill, block accounting, preemption, queue limits.

use super::*;
use tessera_worker::executor::SeqResult;

fn req(prompt_len: usize, max_tokens: usize) -> SeqRequest {
    SeqRequest {
        prompt: (0..prompt_len as u32).map(|i| 100 + i).collect(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        top_logprobs: 0,
        prompt_logprobs: false,
        stop_token_ids: vec![],
        priority: Priority::Interactive,
    }
}

fn cfg(num_blocks: usize, max_step_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        block_size: 4,
        num_blocks,
        max_running: 8,
        max_waiting: 8,
        max_step_tokens,
    }
}

/// What workers would answer: token `7` for every sampled sequence, prompt log-probabilities
/// (-1 each, `None` first) when asked.
fn answer(plan: &Plan) -> StepResult {
    StepResult {
        results: plan
            .steps
            .iter()
            .map(|s| SeqResult {
                seq_id: s.seq_id,
                token: s.sample.then_some(7),
                logprob: -0.5,
                top_logprobs: vec![],
                prompt_logprobs: if s.prompt_logprobs {
                    let first = s.context_len - s.tokens.len();
                    (first..s.context_len)
                        .map(|p| (p > 0).then_some(-1.0))
                        .collect()
                } else {
                    vec![]
                },
            })
            .collect(),
        expert_counts: vec![],
    }
}

/// Schedules a step and completes it with [`answer`].
fn run_step(s: &mut Scheduler) -> Vec<SeqOutput> {
    let plan = s.schedule();
    s.complete(&answer(&plan))
}

fn ids_of(plan: &Plan) -> Vec<u64> {
    ids(plan)
}

fn ids(plan: &Plan) -> Vec<u64> {
    plan.steps.iter().map(|s| s.seq_id).collect()
}

#[test]
fn sequences_join_and_leave_the_batch_every_step() {
    let mut s = Scheduler::new(cfg(32, 64));
    s.add(1, req(3, 2)).unwrap();
    let plan = s.schedule();
    assert_eq!(ids(&plan), [1]);
    assert_eq!(plan.steps[0].tokens, [100, 101, 102]);
    assert!(plan.steps[0].sample);
    s.complete(&answer(&plan));
    // A second request joins while the first decodes.
    s.add(2, req(2, 3)).unwrap();
    let plan = s.schedule();
    assert_eq!(ids(&plan), [1, 2]);
    assert_eq!(plan.steps[0].tokens, [7]);
    assert_eq!(plan.steps[0].context_len, 4);
    let out = s.complete(&answer(&plan));
    assert_eq!(out[0].finish, Some(Finish::Length), "1 reached max_tokens");
    assert_eq!(out[1].finish, None);
    // 1 has left; 2 decodes alone until its max_tokens.
    let plan = s.schedule();
    assert_eq!(ids(&plan), [2]);
    s.complete(&answer(&plan));
    let out = run_step(&mut s);
    assert_eq!(out[0].finish, Some(Finish::Length));
    assert!(!s.has_work());
    assert_eq!(s.stats().used_blocks, 0, "every block is back");
}

#[test]
fn long_prompts_are_prefilled_in_chunks_under_the_token_budget() {
    let mut s = Scheduler::new(cfg(32, 4));
    s.add(1, req(10, 2)).unwrap();
    let mut chunks = vec![];
    loop {
        let plan = s.schedule();
        let step = &plan.steps[0];
        chunks.push((step.tokens.len(), step.context_len, step.sample));
        assert_eq!(step.block_table.len(), step.context_len.div_ceil(4));
        if !s.complete(&answer(&plan)).is_empty() {
            break;
        }
    }
    assert_eq!(chunks, [(4, 4, false), (4, 8, false), (2, 10, true)]);
    // Decode tokens go first, then a new prompt's chunk takes what is left of the budget.
    s.add(2, req(6, 1)).unwrap();
    let plan = s.schedule();
    assert_eq!(ids(&plan), [1, 2]);
    assert_eq!(plan.steps[0].tokens.len(), 1);
    assert_eq!(plan.steps[1].tokens, [100, 101, 102]);
    assert!(!plan.steps[1].sample);
}

#[test]
fn blocks_are_allocated_as_sequences_grow_and_freed_when_they_end() {
    let mut s = Scheduler::new(cfg(8, 64));
    s.add(1, req(4, 6)).unwrap();
    run_step(&mut s);
    assert_eq!(
        s.stats().used_blocks,
        1,
        "4 prompt positions fill one block"
    );
    run_step(&mut s);
    assert_eq!(
        s.stats().used_blocks,
        2,
        "the first generated token needs a second block"
    );
    assert!(s.remove(1));
    assert_eq!(s.stats().used_blocks, 0);
    assert!(!s.remove(1), "a second removal finds nothing");
}

#[test]
fn when_blocks_run_out_the_newest_sequence_is_preempted_and_recomputed() {
    // 4 blocks of 4 positions; two sequences of 8 prompt tokens each need 2 blocks to start and
    // a third for their first generated token.
    let mut s = Scheduler::new(cfg(4, 64));
    s.add(1, req(8, 4)).unwrap();
    s.add(2, req(8, 4)).unwrap();
    let plan = s.schedule();
    assert_eq!(ids(&plan), [1, 2]);
    s.complete(&answer(&plan)); // all 4 blocks used
    let plan = s.schedule();
    assert_eq!(
        plan.preempted,
        [2],
        "the newer sequence gives its blocks back"
    );
    assert_eq!(ids(&plan), [1]);
    assert_eq!(s.stats().preemptions, 1);
    s.complete(&answer(&plan));
    run_step(&mut s);
    let out = run_step(&mut s);
    assert_eq!(out[0].finish, Some(Finish::Length), "1 finishes");
    // 2 is recomputed: its prompt and its generated token are prefilled again together.
    let plan = s.schedule();
    assert_eq!(ids(&plan), [2]);
    let mut expected: Vec<u32> = (100..108).collect();
    expected.push(7);
    assert_eq!(plan.steps[0].tokens, expected);
    assert_eq!(plan.steps[0].prompt_len, 8);
    assert!(plan.steps[0].sample);
    let mut generated = 1;
    let mut plan = plan;
    loop {
        let out = s.complete(&answer(&plan));
        generated += out.len();
        if out.iter().any(|o| o.finish.is_some()) {
            break;
        }
        plan = s.schedule();
    }
    assert_eq!(
        generated, 4,
        "max_tokens counts tokens from before the preemption"
    );
    assert_eq!(s.stats().used_blocks, 0);
}

#[test]
fn batch_work_yields_to_interactive_work() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_running: 1,
        ..cfg(16, 64)
    });
    s.add(
        1,
        SeqRequest {
            priority: Priority::Batch,
            ..req(2, 2)
        },
    )
    .unwrap();
    s.add(2, req(2, 1)).unwrap();
    assert_eq!(
        ids(&s.schedule()),
        [2],
        "interactive first despite arriving later"
    );
}

#[test]
fn max_running_bounds_the_batch() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_running: 2,
        ..cfg(16, 64)
    });
    for id in 0..3 {
        s.add(id, req(2, 5)).unwrap();
    }
    let plan = s.schedule();
    assert_eq!(ids(&plan), [0, 1]);
    assert_eq!(s.stats().waiting, 1);
}

#[test]
fn a_full_queue_and_an_oversized_request_are_refused_without_side_effects() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_waiting: 2,
        ..cfg(4, 64)
    });
    s.add(1, req(2, 2)).unwrap();
    s.add(2, req(2, 2)).unwrap();
    assert_eq!(s.add(3, req(2, 2)), Err(AdmitError::QueueFull { limit: 2 }));
    assert_eq!(
        s.add(4, req(10, 10)),
        Err(AdmitError::TooLarge {
            needed: 5,
            capacity: 4
        })
    );
    assert_eq!(s.add(1, req(1, 1)), Err(AdmitError::DuplicateId(1)));
    assert_eq!(s.stats().waiting, 2);
    // Once they run, the queue has room again.
    s.schedule();
    s.add(3, req(2, 2)).unwrap();
}

#[test]
fn stop_tokens_end_a_sequence() {
    let mut s = Scheduler::new(cfg(16, 64));
    s.add(
        1,
        SeqRequest {
            stop_token_ids: vec![7],
            ..req(2, 10)
        },
    )
    .unwrap();
    let out = run_step(&mut s);
    assert_eq!(out[0].finish, Some(Finish::Stop));
    assert!(!s.has_work());
}

#[test]
fn prompt_logprobs_are_gathered_across_chunks_and_reported_once() {
    let mut s = Scheduler::new(cfg(16, 3));
    s.add(
        1,
        SeqRequest {
            prompt_logprobs: true,
            ..req(7, 3)
        },
    )
    .unwrap();
    let mut reported = vec![];
    while s.has_work() {
        let plan = s.schedule();
        for o in s.complete(&answer(&plan)) {
            reported.push(o.prompt_logprobs);
        }
    }
    assert_eq!(reported.len(), 3);
    let first = reported[0].as_ref().expect("the first token carries them");
    assert_eq!(first.len(), 7);
    assert_eq!(first[0], None);
    assert!(first[1..].iter().all(|v| *v == Some(-1.0)));
    assert!(reported[1..].iter().all(Option::is_none));
}

#[test]
fn a_removed_sequence_is_ignored_in_late_results() {
    let mut s = Scheduler::new(cfg(16, 64));
    s.add(1, req(2, 4)).unwrap();
    let plan = s.schedule();
    s.remove(1);
    assert!(s.complete(&answer(&plan)).is_empty());
    assert_eq!(s.stats().used_blocks, 0);
}

#[test]
fn preempting_everything_frees_every_block_and_keeps_the_work() {
    let mut s = Scheduler::new(cfg(8, 64));
    s.add(1, req(5, 4)).unwrap();
    s.add(2, req(3, 4)).unwrap();
    run_step(&mut s);
    let mut ids = s.preempt_all();
    ids.sort();
    assert_eq!(ids, [1, 2]);
    assert_eq!(s.stats().used_blocks, 0);
    assert_eq!(s.stats().waiting, 2);
    s.resize(4);
    assert_eq!(s.stats().num_blocks, 4);
    // Both are recomputed with their generated token, in their original order.
    let plan = s.schedule();
    assert_eq!(ids_of(&plan), [1, 2]);
    assert_eq!(plan.steps[0].tokens.len(), 6);
}

#[test]
fn invalid_limits_are_named() {
    let e = SchedulerConfig {
        max_step_tokens: 0,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.contains("max_step_tokens"));
}
