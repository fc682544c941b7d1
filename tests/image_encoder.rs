//! The image encoder on real photographs: five photos that ship in the
//! scikit-image and matplotlib wheels (`scripts/models` extracts them to
//! `tests/data/photos/`) go the way a room's JPEG frame goes — encoded as
//! JPEG by the `ffmpeg` CLI, decoded and normalised by `decode::video`, and
//! embedded by MobileNetV2 on ONNX Runtime. The ImageNet top-1 class of at
//! least 4 of the 5 must be right; every top-5 is printed.

mod common;

use common::media::{ffmpeg, read, scratch};
use onair::decode::video::{decode_video, Timeline, VideoConfig, VideoInput};
use onair::models::image::ImageEncoder;
use onair::schema::VideoFormat;

/// ImageNet-1k indices (standard order) accepted for each photo.
const PHOTOS: [(&str, &[(usize, &str)]); 5] = [
    (
        "chelsea.png",
        &[(281, "tabby"), (282, "tiger cat"), (285, "Egyptian cat")],
    ),
    (
        "coffee.png",
        &[(967, "espresso"), (968, "cup"), (504, "coffee mug")],
    ),
    (
        "motorcycle_left.png",
        &[(665, "moped"), (670, "motor scooter")],
    ),
    ("grace_hopper.jpg", &[(652, "military uniform")]),
    (
        "rocket.jpg",
        &[
            (812, "space shuttle"),
            (657, "missile"),
            (744, "projectile"),
        ],
    ),
];

#[test]
fn photos_are_recognised_through_the_frame_path() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let photos = root.join("tests/data/photos");
    let dir = scratch("image-encoder");
    let cfg = VideoConfig::default();
    let mut batch = Vec::new();
    for (name, _) in PHOTOS {
        let src = photos.join(name);
        assert!(
            src.is_file(),
            "{} is missing: run scripts/models",
            src.display()
        );
        let jpg = format!("{name}.jpg");
        ffmpeg(
            &dir,
            &[
                "-i",
                src.to_str().expect("utf-8 path"),
                "-q:v",
                "2",
                "-pix_fmt",
                "yuvj420p",
                &jpg,
            ],
        );
        let payload = read(&dir, &jpg);
        let decoded = decode_video(
            &VideoInput {
                format: VideoFormat::Jpeg,
                payload: &payload,
                init: None,
                start_time_ms: 0,
                duration_ms: 0,
            },
            &cfg,
            &mut Timeline::default(),
            None,
        )
        .unwrap_or_else(|e| panic!("{name} decodes: {e}"));
        let frame = decoded.frames.first().expect("one frame");
        assert_eq!(frame.tensor.len(), ImageEncoder::FRAME);
        batch.extend_from_slice(&frame.tensor);
    }
    let mut encoder =
        ImageEncoder::load(&root.join("models/image/1/model.onnx"), 1).expect("encoder");
    let out = encoder.embed(&batch).expect("batch of 5");
    let mut right = 0;
    for (i, (name, accepted)) in PHOTOS.iter().enumerate() {
        let top = out.top(i, 5);
        let ok = accepted.iter().any(|(c, _)| *c == top[0].0);
        right += usize::from(ok);
        println!(
            "{name:<20} top-1 {} ({:.3}) {}; top-5 {:?}; accepted {:?}",
            top[0].0,
            top[0].1,
            if ok { "right" } else { "wrong" },
            top.iter()
                .map(|(c, p)| format!("{c}:{p:.2}"))
                .collect::<Vec<_>>(),
            accepted
        );
        let emb = out.embedding(i).expect("embedding");
        assert!(
            emb.iter().all(|v| v.is_finite() && *v >= 0.0),
            "pooled ReLU6 features are finite and non-negative"
        );
    }
    // One frame alone gives what it gave in the batch.
    let alone = encoder
        .embed(&batch[..ImageEncoder::FRAME])
        .expect("batch of 1");
    let (a, b) = (
        alone.embedding(0).expect("emb"),
        out.embedding(0).expect("emb"),
    );
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "batch of 1 vs batch of 5: max diff {diff}");
    println!("top-1 right for {right} of {} photos", PHOTOS.len());
    assert!(right >= 4, "top-1 right for only {right} of 5 photos");
    // Wrong input is an error, not a panic.
    assert!(encoder.embed(&batch[..100]).is_err());
    assert!(encoder.embed(&[]).is_err());
}

/// A frame's embedding has the same bits whatever batch it runs in (alone,
/// first of two, in the middle of 5, last of 16 and of 32): the batcher
/// groups frames as they come, so a replay batches them otherwise, and
/// MMBee's content and the room features must come out the same.
#[test]
fn an_embedding_does_not_depend_on_its_batch() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    onair::models::onnx::init_onnx_runtime(None).expect("ONNX Runtime (run scripts/models)");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let frames: Vec<Vec<f32>> = (0..32)
        .map(|_| {
            (0..ImageEncoder::FRAME)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 4001) as f32 / 1000.0 - 2.0
                })
                .collect()
        })
        .collect();
    for threads in [1, 2] {
        let mut encoder =
            ImageEncoder::load(&root.join("models/image/1/model.onnx"), threads).expect("encoder");
        let mut bits = |order: &[usize], at: usize| -> Vec<u32> {
            let batch: Vec<f32> = order.iter().flat_map(|&i| frames[i].clone()).collect();
            let out = encoder.embed(&batch).expect("embed");
            out.embedding(at)
                .expect("embedding")
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let want = bits(&[0], 0);
        assert_eq!(bits(&[0, 1], 0), want, "first of two, {threads} threads");
        assert_eq!(
            bits(&[3, 1, 0, 4, 2], 2),
            want,
            "3rd of 5, {threads} threads"
        );
        let sixteen: Vec<usize> = (1..16).chain([0]).collect();
        assert_eq!(bits(&sixteen, 15), want, "last of 16, {threads} threads");
        let all: Vec<usize> = (0..32).rev().collect();
        assert_eq!(bits(&all, 31), want, "last of 32, {threads} threads");
    }
}
