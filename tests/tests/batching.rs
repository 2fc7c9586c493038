//! Continuous batching on the tiny model (f32, both weight formats): a
//! question answered inside a batch, joining at any step, with its prompt
//! prefilled in chunks and its system prefix from the prefix cache, gets
//! exactly the tokens it gets alone; each sequence keeps its own
//! `max_tokens`, stop tokens and seed.

use std::collections::HashMap;

use candle_core::{DType, Device};
use ebb_nats::{FinishReason, Job, Sampling};
use ebb_tests::{TempDir, tiny_model_dir};
use ebb_worker::engine::{Engine, EngineConfig, Output, Request, SeqId};
use ebb_worker::generate::{Generation, Generator, Prompts};
use ebb_worker::model::{ModelFiles, Qwen, WeightFiles};
use ebb_worker::tiny::{self, Shape};

fn job(question: &str, max_tokens: u32, grade: u8) -> Job {
    ebb_tests::tiny_job(question, max_tokens, Some(grade))
}

/// Eight questions of different lengths and `max_tokens`, two grades (so
/// two shared prefixes).
fn questions() -> Vec<Job> {
    let texts = [
        "What is 2 + 2?",
        "Why is the sky blue? Explain it like I am ten years old, with an example.",
        "Name three planets.",
        "How do plants make food from sunlight, water and air? Please go step by step and use simple words.",
        "Define a noun.",
        "What is the area of a circle with radius 3? 圆的面积是多少?",
        "Who wrote Romeo and Juliet, and when was it first performed on a stage in London?",
        "Is zero even?",
    ];
    let max_tokens = [12, 30, 7, 25, 1, 40, 18, 33];
    texts
        .iter()
        .zip(max_tokens)
        .enumerate()
        .map(|(i, (text, max))| job(text, max, if i % 2 == 0 { 5 } else { 9 }))
        .collect()
}

fn safetensors_files() -> ModelFiles {
    let dir = tiny_model_dir();
    ModelFiles {
        config: Some(dir.join("config.json")),
        tokenizer: dir.join("tokenizer.json"),
        weights: WeightFiles::Safetensors(vec![dir.join("model.safetensors")]),
    }
}

fn gguf_files(dir: &TempDir) -> ModelFiles {
    tiny::write_random_gguf(dir.path(), Shape::TINY, 42).unwrap();
    ModelFiles {
        config: None,
        tokenizer: dir.path().join("tokenizer.json"),
        weights: WeightFiles::Gguf(dir.path().join("model-q8_0.gguf")),
    }
}

fn prompts(files: &ModelFiles) -> Prompts {
    Prompts::new(
        &files.tokenizer,
        "You are a tutor for school students.".into(),
    )
    .unwrap()
}

fn engine(files: &ModelFiles, prefill_chunk: usize, prefix_cache_tokens: usize) -> Engine {
    engine_in(files, DType::F32, prefill_chunk, prefix_cache_tokens)
}

/// An engine on `files` loaded in `dtype` (f16 on CPU: ebb's own f16
/// matmul; f32: candle's).
fn engine_in(
    files: &ModelFiles,
    dtype: DType,
    prefill_chunk: usize,
    prefix_cache_tokens: usize,
) -> Engine {
    let model = Qwen::load(files, &Device::Cpu, dtype).unwrap();
    let config = EngineConfig {
        prefill_chunk,
        prefix_cache_tokens,
    };
    Engine::new(model, prompts(files).tokenizer().clone(), config)
}

/// Each request answered alone, one after the other, on a fresh engine.
fn alone(files: &ModelFiles, dtype: DType, requests: &[Request]) -> Vec<Generation> {
    let mut engine = engine_in(files, dtype, 512, 0);
    requests
        .iter()
        .map(|request| {
            let id = engine.admit(request.clone()).unwrap();
            run_until_done(&mut engine, &[id]).remove(&id).unwrap()
        })
        .collect()
}

fn run_until_done(engine: &mut Engine, ids: &[SeqId]) -> HashMap<SeqId, Generation> {
    let mut done = HashMap::new();
    while done.len() < ids.len() {
        collect(engine.step(), &mut done);
    }
    done
}

fn collect(outputs: Vec<Output>, done: &mut HashMap<SeqId, Generation>) {
    for output in outputs {
        if let Output::Finished(id, result) = output {
            done.insert(id, result.expect("every sequence answers"));
        }
    }
}

/// The requests inside one batch: three at the start, the rest joining at
/// later steps while the others decode.
fn batched(mut engine: Engine, requests: &[Request]) -> (Vec<Generation>, Engine) {
    let joins_at_step = [0, 0, 0, 2, 2, 5, 9, 9];
    let mut ids = vec![None; requests.len()];
    let mut done = HashMap::new();
    let mut step = 0;
    while done.len() < requests.len() {
        for (index, request) in requests.iter().enumerate() {
            if joins_at_step[index] == step {
                ids[index] = Some(engine.admit(request.clone()).unwrap());
            }
        }
        collect(engine.step(), &mut done);
        step += 1;
    }
    let answers = ids
        .iter()
        .map(|id| done.remove(&id.unwrap()).unwrap())
        .collect();
    (answers, engine)
}

fn assert_same_tokens(files: &ModelFiles, dtype: DType) {
    let prompts = prompts(files);
    let requests: Vec<Request> = questions()
        .iter()
        .map(|job| prompts.request(job, 8_192).unwrap())
        .collect();
    assert!(
        requests.iter().all(|r| r.prompt.shared_prefix > 0),
        "every prompt starts with its grade's system block"
    );
    let reference = alone(files, dtype, &requests);
    // Small chunks: long prompts take several steps, interleaved with decodes.
    let (with_prefixes, engine) = batched(engine_in(files, dtype, 16, 4096), &requests);
    let (without_prefixes, _) = batched(engine_in(files, dtype, 16, 0), &requests);
    for (index, expected) in reference.iter().enumerate() {
        assert!(expected.completion_tokens >= 1);
        assert_eq!(
            with_prefixes[index].tokens, expected.tokens,
            "question {index}, prefix cache on"
        );
        assert_eq!(with_prefixes[index].text, expected.text, "question {index}");
        assert_eq!(with_prefixes[index].finish_reason, expected.finish_reason);
        assert_eq!(
            without_prefixes[index].tokens, expected.tokens,
            "question {index}, prefix cache off"
        );
    }
    // Once a grade's system block has been prefilled, every later question
    // of that grade starts from the cached prefix: exactly its length saved.
    let mut engine = engine;
    let before = engine.prefill_counts();
    let again: Vec<SeqId> = requests[..2]
        .iter()
        .map(|r| engine.admit(r.clone()).unwrap())
        .collect();
    let answers = run_until_done(&mut engine, &again);
    let after = engine.prefill_counts();
    let prefixes: u64 = requests[..2]
        .iter()
        .map(|r| r.prompt.shared_prefix as u64)
        .sum();
    assert_eq!(
        after.saved - before.saved,
        prefixes,
        "both grades' prefixes reused"
    );
    let prompts: u64 = requests[..2]
        .iter()
        .map(|r| r.prompt.ids.len() as u64)
        .sum();
    assert_eq!(
        after.run - before.run,
        prompts - prefixes,
        "only the rest of each prompt ran"
    );
    assert_eq!(answers[&again[0]].tokens, reference[0].tokens);
    assert_eq!(answers[&again[1]].tokens, reference[1].tokens);
}

#[test]
fn greedy_answers_are_token_identical_batched_and_alone_safetensors() {
    assert_same_tokens(&safetensors_files(), DType::F32);
}

#[test]
fn greedy_answers_are_token_identical_batched_and_alone_safetensors_f16() {
    // f16 is the CPU default and runs on ebb's own matmul.
    assert_same_tokens(&safetensors_files(), DType::F16);
}

#[test]
fn greedy_answers_are_token_identical_batched_and_alone_gguf() {
    let dir = TempDir::new("batching-gguf");
    assert_same_tokens(&gguf_files(&dir), DType::F32);
}

#[test]
fn max_tokens_stop_tokens_and_seeds_are_per_sequence() {
    let files = safetensors_files();
    let prompts = prompts(&files);
    let base = prompts
        .request(&job("Tell me a story about a cat.", 24, 5), 8_192)
        .unwrap();
    let reference = alone(&files, DType::F32, std::slice::from_ref(&base));
    let answer = &reference[0].tokens;
    assert!(
        answer.len() >= 6,
        "the reference answer is long enough: {answer:?}"
    );

    // The same question four ways in one batch.
    let short = Request {
        max_new: 3,
        ..base.clone()
    };
    let stop_at = answer[4];
    let stopped = Request {
        stop_tokens: [base.stop_tokens.clone(), vec![stop_at]].concat(),
        ..base.clone()
    };
    let sampled = |seed| Request {
        sampling: Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed,
        },
        ..base.clone()
    };
    let requests = [base.clone(), short, stopped, sampled(7), sampled(8)];
    let mut engine = engine(&files, 512, 4096);
    let ids: Vec<SeqId> = requests
        .iter()
        .map(|r| engine.admit(r.clone()).unwrap())
        .collect();
    let done = run_until_done(&mut engine, &ids);
    let got = |i: usize| &done[&ids[i]];

    assert_eq!(got(0).tokens, *answer);
    assert_eq!(
        got(1).tokens,
        answer[..3],
        "max_tokens 3 alone of the batch"
    );
    assert_eq!(got(1).finish_reason, FinishReason::Length);
    let first_stop = answer.iter().position(|t| *t == stop_at).unwrap();
    assert_eq!(
        got(2).tokens,
        answer[..first_stop],
        "its own stop token ends it"
    );
    assert_eq!(got(2).finish_reason, FinishReason::Stop);
    // Seeded sampling inside the batch is what the same seed gives alone.
    let sampled_alone = alone(&files, DType::F32, &[sampled(7), sampled(8)]);
    assert_eq!(got(3).tokens, sampled_alone[0].tokens, "seed 7");
    assert_eq!(got(4).tokens, sampled_alone[1].tokens, "seed 8");
}

#[test]
fn a_prompt_longer_than_the_context_fails_alone_and_the_batch_goes_on() {
    let dir = TempDir::new("batching-short-context");
    let shape = Shape {
        max_position_embeddings: 96,
        ..Shape::TINY
    };
    tiny::write_random_model(dir.path(), shape, 1, DType::F32).unwrap();
    let files = ModelFiles {
        config: Some(dir.path().join("config.json")),
        tokenizer: dir.path().join("tokenizer.json"),
        weights: WeightFiles::Safetensors(vec![dir.path().join("model.safetensors")]),
    };
    let model = Qwen::load(&files, &Device::Cpu, DType::F32).unwrap();
    let prompts = Prompts::new(&files.tokenizer, "Tutor.".into()).unwrap();
    let mut generator = Generator::new(
        model,
        prompts,
        EngineConfig {
            prefill_chunk: 512,
            prefix_cache_tokens: 0,
        },
    );
    let ok = generator.prompts.request(&job("Hi?", 4, 5), 96).unwrap();
    let mut too_long = ok.clone();
    too_long.prompt.ids = vec![1; 200];
    let engine = &mut generator.engine;
    let id = engine.admit(ok).unwrap();
    assert!(engine.admit(too_long).is_err(), "refused at admission");
    let done = run_until_done(engine, &[id]);
    assert!(done[&id].completion_tokens >= 1);
}
