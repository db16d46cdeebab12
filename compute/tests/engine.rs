//! The engine on the real small models (fetched by `meshd models fetch`
//! into `$CRANK_MODELS_DIR`, default `~/.cache/crank-mesh/models`).

mod common;

use std::sync::OnceLock;

use common::model;
use compute::llama::chat::TemplateSource;
use compute::{ComputeError, Embedder, FinishReason, Generator};

fn embedder() -> &'static Embedder {
    static E: OnceLock<Embedder> = OnceLock::new();
    E.get_or_init(|| Embedder::load(&model("all-minilm-l6-v2")).expect("embedding model loads"))
}

fn generator() -> &'static Generator {
    static G: OnceLock<Generator> = OnceLock::new();
    G.get_or_init(|| {
        Generator::load(&model("smollm2-135m-instruct"), 1024).expect("chat model loads")
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn embeddings_are_unit_vectors_that_rank_similar_sentences_higher() {
    let e = embedder();
    assert_eq!(e.dimensions(), 384);
    let inputs = [
        "A cat sits on the mat.",
        "There is a cat sitting on a rug.",
        "Stock markets fell sharply on Monday.",
    ]
    .map(String::from);
    let out = e.embed(&inputs).unwrap();
    assert_eq!(out.vectors.len(), 3);
    for v in &out.vectors {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let similar = cosine(&out.vectors[0], &out.vectors[1]);
    let unrelated = cosine(&out.vectors[0], &out.vectors[2]);
    assert!(
        similar > unrelated + 0.2,
        "similar {similar} vs unrelated {unrelated}"
    );
    assert!(out.prompt_tokens > 10);

    // Batched and one-by-one agree.
    let alone = e.embed(&inputs[..1]).unwrap();
    assert!(cosine(&alone.vectors[0], &out.vectors[0]) > 0.9999);
}

#[test]
fn bad_embedding_input_is_refused_not_crashed() {
    let e = embedder();
    assert!(matches!(e.embed(&[]), Err(ComputeError::EmptyInput)));
    assert!(matches!(
        e.embed(&["  ".into()]),
        Err(ComputeError::EmptyInput)
    ));
    let long = "word ".repeat(e.max_tokens() + 10);
    let err = e.embed(&["fine".into(), long]).unwrap_err();
    assert!(
        matches!(err, ComputeError::InputTooLong { index: 1, .. }),
        "{err}"
    );
    assert!(err.is_client_error());
    // Still serving afterwards.
    assert_eq!(e.embed(&["still here".into()]).unwrap().vectors.len(), 1);
}

#[test]
fn greedy_completion_is_deterministic_and_streams() {
    let g = generator();
    let prompt = g
        .chat_prompt(&[("user".into(), "Name three colours.".into())])
        .unwrap();
    assert!(prompt.contains("Name three colours."));
    let mut streamed = String::new();
    let first = g
        .complete(&prompt, 24, |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    assert!(first.completion_tokens > 0 && first.completion_tokens <= 24);
    assert!(matches!(
        first.finish,
        FinishReason::Stop | FinishReason::Length
    ));
    assert_eq!(streamed, first.text, "the stream is the text");
    assert!(first.prompt_tokens > 5);
    let second = g.complete(&prompt, 24, |_| true).unwrap();
    assert_eq!(second.text, first.text, "greedy decoding is deterministic");

    // The receiver going away stops generation.
    let stopped = g.complete(&prompt, 24, |_| false).unwrap();
    assert_eq!(stopped.finish, FinishReason::Cancelled);
    assert_eq!(stopped.completion_tokens, 1);

    // A prompt that cannot fit is an error for the caller.
    let huge = "word ".repeat(2000);
    let err = g.complete(&huge, 10, |_| true).unwrap_err();
    assert!(matches!(err, ComputeError::ContextExceeded { .. }), "{err}");
    assert!(matches!(
        g.complete("", 10, |_| true),
        Err(ComputeError::EmptyInput)
    ));
}

#[test]
fn the_chat_model_answers_a_question_in_its_own_format() {
    let g = generator();
    assert_eq!(g.chat_format().source(), TemplateSource::Embedded);
    let prompt = g
        .chat_prompt(&[("user".into(), "What is the capital of France?".into())])
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let mut streamed = String::new();
    let out = g
        .complete(&prompt, 48, |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    assert_eq!(out.finish, FinishReason::Stop, "{:?}", out.text);
    assert_eq!(streamed, out.text);
    for marker in ["<|im_end|>", "<|im_start|>", "<|endoftext|>"] {
        assert!(!out.text.contains(marker), "{:?}", out.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_decodes_and_get_their_own_vectors() {
    let batcher = std::sync::Arc::new(
        compute::EmbedBatcher::start(std::sync::Arc::new(
            Embedder::load(&model("all-minilm-l6-v2")).unwrap(),
        ))
        .unwrap(),
    );
    let sentences: Vec<String> = (0..24)
        .map(|i| format!("sentence number {i} about topic {}", i % 5))
        .collect();
    let alone = embedder().embed(&sentences).unwrap();
    let tasks: Vec<_> = sentences
        .iter()
        .map(|s| {
            let (b, s) = (batcher.clone(), s.clone());
            tokio::spawn(async move { b.embed(vec![s]).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap().unwrap();
        assert_eq!(out.vectors.len(), 1);
        let c = cosine(&out.vectors[0], &alone.vectors[i]);
        assert!(
            c > 0.9999,
            "request {i} got someone else's vector (cosine {c})"
        );
    }
    let decodes = batcher.decodes();
    assert!(
        decodes < 24,
        "24 concurrent requests took {decodes} decodes: no batching"
    );
    // Errors stay with their request.
    assert!(matches!(
        batcher.embed(vec![" ".into()]).await,
        Err(ComputeError::EmptyInput)
    ));
    assert_eq!(
        batcher
            .embed(vec!["still serving".into()])
            .await
            .unwrap()
            .vectors
            .len(),
        1
    );
}
