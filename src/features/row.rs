//! The flat input row of one room tick: a room-features record laid out as
//! the fixed-width vector the highlight model reads, online and in the
//! training samples the engine logs (layout `highlight-row-v1`).
//!
//! What it is for: one definition of that layout, shared by the sample
//! logger and the highlight operator, so training and serving cannot drift.
//!
//! What it is not for: normalisation (the model standardises its inputs
//! itself, with statistics from its training set) or computing features.
//!
//! # Layout (`ROW_WIDTH` = 2120 float32 values)
//! | range | what |
//! |---|---|
//! | 0..1280 | mean image embedding of the tick's frames (zeros: no frame) |
//! | 1280..1664 | mean text embedding of the tick's comments (zeros: none) |
//! | 1664..2048 | mean text embedding of transcripts written with the tick (zeros: none) |
//! | 2048..2080 | audio log-mel band means (zeros: no audio) |
//! | 2080..2112 | audio log-mel band standard deviations |
//! | 2112..2120 | frames, comments, transcripts, audio seconds, RMS dBFS, peak dBFS, speech ratio (-1: unknown), has audio (0/1) |
//!
//! A part that is longer than its slot is cut, a shorter one padded with
//! zeros, so a record from other encoders still yields a row of the same
//! width (the model then sees garbage, but nothing panics).

use crate::features::audio::MEL_BANDS;
use crate::models::image::ImageEncoder;
use crate::models::text::TextEncoder;
use crate::schema::RoomFeatures;

/// Name of this layout, written with every training sample.
pub const LAYOUT: &str = "highlight-row-v1";
/// Where each part starts.
pub const IMAGE_AT: usize = 0;
/// Comment embedding.
pub const COMMENTS_AT: usize = IMAGE_AT + ImageEncoder::EMBEDDING;
/// Transcript embedding.
pub const TRANSCRIPTS_AT: usize = COMMENTS_AT + TextEncoder::DIM;
/// Log-mel means.
pub const MEL_MEAN_AT: usize = TRANSCRIPTS_AT + TextEncoder::DIM;
/// Log-mel standard deviations.
pub const MEL_STD_AT: usize = MEL_MEAN_AT + MEL_BANDS;
/// The scalars.
pub const SCALARS_AT: usize = MEL_STD_AT + MEL_BANDS;
/// Number of scalars.
pub const SCALARS: usize = 8;
/// Values in a row.
pub const ROW_WIDTH: usize = SCALARS_AT + SCALARS;

/// Writes `part` into `row[at..at + len]`, cut or zero-padded to `len`.
fn put(row: &mut [f32], at: usize, len: usize, part: &[f32]) {
    let n = part.len().min(len);
    row[at..at + n].copy_from_slice(&part[..n]);
}

/// The row of one tick's features.
pub fn tick_row(f: &RoomFeatures) -> Vec<f32> {
    let mut row = vec![0.0f32; ROW_WIDTH];
    put(
        &mut row,
        IMAGE_AT,
        ImageEncoder::EMBEDDING,
        &f.image_embedding,
    );
    put(
        &mut row,
        COMMENTS_AT,
        TextEncoder::DIM,
        &f.comment_embedding,
    );
    put(
        &mut row,
        TRANSCRIPTS_AT,
        TextEncoder::DIM,
        &f.transcript_embedding,
    );
    let mut scalars = [
        f.frames as f32,
        f.comments as f32,
        f.transcripts as f32,
        0.0,
        -120.0,
        -120.0,
        -1.0,
        0.0,
    ];
    if let Some(a) = &f.audio {
        put(&mut row, MEL_MEAN_AT, MEL_BANDS, &a.log_mel_mean);
        put(&mut row, MEL_STD_AT, MEL_BANDS, &a.log_mel_std);
        scalars[3] = a.audio_ms as f32 / 1000.0;
        scalars[4] = a.rms_dbfs;
        scalars[5] = a.peak_dbfs;
        scalars[6] = a.speech_ratio.unwrap_or(-1.0);
        scalars[7] = if a.audio_ms > 0 { 1.0 } else { 0.0 };
    }
    put(&mut row, SCALARS_AT, SCALARS, &scalars);
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::AudioFeatures;

    #[test]
    fn parts_land_in_their_slots() {
        assert_eq!(ROW_WIDTH, 2120);
        let f = RoomFeatures {
            image_embedding: vec![1.0; ImageEncoder::EMBEDDING],
            frames: 2,
            comment_embedding: vec![2.0; TextEncoder::DIM],
            comments: 5,
            transcript_embedding: Vec::new(),
            audio: Some(AudioFeatures {
                audio_ms: 1000,
                log_mel_mean: vec![3.0; MEL_BANDS],
                log_mel_std: vec![4.0; MEL_BANDS],
                rms_dbfs: -30.0,
                peak_dbfs: -6.0,
                speech_ratio: None,
            }),
            ..RoomFeatures::default()
        };
        let row = tick_row(&f);
        assert_eq!(row.len(), ROW_WIDTH);
        assert!(row[..COMMENTS_AT].iter().all(|&v| v == 1.0));
        assert!(row[COMMENTS_AT..TRANSCRIPTS_AT].iter().all(|&v| v == 2.0));
        assert!(row[TRANSCRIPTS_AT..MEL_MEAN_AT].iter().all(|&v| v == 0.0));
        assert!(row[MEL_MEAN_AT..MEL_STD_AT].iter().all(|&v| v == 3.0));
        assert!(row[MEL_STD_AT..SCALARS_AT].iter().all(|&v| v == 4.0));
        assert_eq!(
            &row[SCALARS_AT..],
            &[2.0, 5.0, 0.0, 1.0, -30.0, -6.0, -1.0, 1.0]
        );
    }

    #[test]
    fn odd_sizes_are_cut_or_padded() {
        let f = RoomFeatures {
            image_embedding: vec![1.0; 5000],
            comment_embedding: vec![2.0; 3],
            ..RoomFeatures::default()
        };
        let row = tick_row(&f);
        assert_eq!(row.len(), ROW_WIDTH);
        assert_eq!(row[COMMENTS_AT - 1], 1.0);
        assert_eq!(&row[COMMENTS_AT..COMMENTS_AT + 4], &[2.0, 2.0, 2.0, 0.0]);
        assert_eq!(&row[SCALARS_AT + 3..], &[0.0, -120.0, -120.0, -1.0, 0.0]);
    }
}
