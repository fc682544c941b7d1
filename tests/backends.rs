//! The two backends compute the same functions: ONNX Runtime on `model.onnx`
//! and libtorch on `model.pt` (exported by `scripts/torch` from the same
//! weights), on CPU, for every encoder.
//!
//! Tolerances (stated, and printed with what was measured):
//! - image encoder: embeddings within 1e-4 absolute (values up to about 10),
//!   logits within 1e-3, the same top-1 class for every frame;
//! - text encoder: unit-length sentence embeddings within 1e-5 absolute.
//!
//! Needs a build with the `torch` feature (`scripts/test` builds one) and the
//! files of `scripts/models` and `scripts/torch`.

#![cfg(feature = "torch")]

use std::path::Path;

use onair::models::image::ImageEncoder;
use onair::models::text::TextEncoder;
use onair::models::torch::{TorchImageEncoder, TorchTextEncoder};

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Frames as the decoder makes them (normalised with ImageNet statistics):
/// smooth gradients, stripes and noise, deterministic.
fn frames(n: usize) -> Vec<f32> {
    let s = ImageEncoder::SIZE;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(n * ImageEncoder::FRAME);
    for k in 0..n {
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let noise = (seed >> 40) as f32 / (1u64 << 24) as f32;
                    let v = match k % 3 {
                        0 => (x + y * c) as f32 / (2.0 * s as f32),
                        1 => f32::from(u8::from((x / (8 + 4 * c)) % 2 == 0)),
                        _ => noise,
                    };
                    out.push((v - 0.45) / 0.226);
                }
            }
        }
    }
    out
}

#[test]
fn onnx_runtime_and_libtorch_agree_on_every_encoder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let batch = frames(6);
    let mut ort = ImageEncoder::load(&root.join("image/1/model.onnx"), 2).expect("onnx image");
    let mut tch = TorchImageEncoder::load(&root.join("image/1/model.pt"), 2)
        .expect("torch image (scripts/torch)");
    let (a, b) = (
        ort.embed(&batch).expect("ort"),
        tch.embed(&batch).expect("tch"),
    );
    let d_emb = max_abs(&a.embeddings, &b.embeddings);
    let d_log = max_abs(&a.logits, &b.logits);
    let top_same = (0..6)
        .filter(|&i| a.top(i, 1)[0].0 == b.top(i, 1)[0].0)
        .count();
    println!("image: embeddings max abs diff {d_emb:.2e} (tolerance 1e-4), logits {d_log:.2e} (1e-3), top-1 equal {top_same}/6");
    assert!(d_emb <= 1e-4 && d_log <= 1e-3 && top_same == 6);

    let texts = [
        "What a great play, that was amazing!",
        "这一波操作太秀了",
        "主播唱得真好听 love it",
        "ok",
        &"long text that will be cut at the model's limit ".repeat(80),
    ];
    let dir = root.join("text/1");
    let mut ort = TextEncoder::load(&dir.join("model.onnx"), &dir.join("tokenizer.json"), 2)
        .expect("onnx text");
    let mut tch = TorchTextEncoder::load(&dir.join("model.pt"), &dir.join("tokenizer.json"), 2)
        .expect("torch text (scripts/torch)");
    let (a, b) = (
        ort.embed(&texts).expect("ort"),
        tch.embed(&texts).expect("tch"),
    );
    let d = max_abs(&a, &b);
    println!(
        "text: sentence embeddings max abs diff {d:.2e} (tolerance 1e-5) over {} texts",
        texts.len()
    );
    assert!(d <= 1e-5);
}

#[test]
fn onnx_runtime_and_libtorch_agree_on_the_highlight_model() {
    use onair::models::highlight::{HighlightModel, StepInput};
    use onair::models::torch::TorchHighlight;
    use std::sync::Arc;
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/highlight");
    let version = onair::models::serving::latest_version(&dir).expect("a highlight version");
    let mut ort = HighlightModel::load(&version, 1).expect("onnx highlight");
    let mut tch = TorchHighlight::load(&version, 1).expect("torch highlight");
    assert_eq!(ort.spec(), tch.spec());
    let width = onair::features::row::ROW_WIDTH;
    // Three rooms stepped together for 40 ticks, each backend keeping its own
    // histories: scores and states must agree all along.
    let mut seed = 7u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32
    };
    let (mut ho, mut ht) = (vec![Vec::new(); 3], vec![Vec::new(); 3]);
    let (mut score_diff, mut state_diff) = (0.0f32, 0.0f32);
    for _ in 0..40 {
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..width).map(|_| next()).collect())
            .collect();
        let inputs = |h: &Vec<Vec<Arc<_>>>| -> Vec<StepInput> {
            (0..3)
                .map(|r| StepInput {
                    x: rows[r].clone(),
                    streamer: rows[r].clone(),
                    history: h[r].clone(),
                })
                .collect()
        };
        let a = ort.step(&inputs(&ho)).expect("onnx step");
        let b = tch.step(&inputs(&ht)).expect("torch step");
        for (r, (a, b)) in a.into_iter().zip(b).enumerate() {
            score_diff = score_diff.max((a.score - b.score).abs());
            state_diff = state_diff.max(max_abs(&a.state.e, &b.state.e));
            ho[r].push(a.state);
            ht[r].push(b.state);
        }
    }
    println!("highlight: scores within {score_diff:e}, states within {state_diff:e}");
    assert!(score_diff < 1e-5 && state_diff < 1e-4);
}
