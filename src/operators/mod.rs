//! Operators: the per-room computations that run inside partition tasks
//! (see [`crate::runtime::Operator`]). Each file is one operator.
//!
//! Not for: anything that talks to Kafka, or state shared across partitions
//! (shared resources, such as the speech-recognition pool, come in through
//! [`Services`]).

pub mod features;
pub mod gift_labels;
pub mod gift_scoring;
pub mod highlight;
pub mod highlight_labels;
pub mod mmbee_content;
pub mod mmbee_fusion;
pub mod mmbee_scoring;
pub mod repartition;
pub mod room_activity;
pub mod speech;
pub mod user_sequences;

use std::sync::Arc;

use crate::config::{PipelineConfig, SpeechConfig};
use crate::models::asr::AsrPool;
use crate::models::ModelError;
use crate::runtime::Operator;

/// What operators share across partitions, built once per process.
#[derive(Clone, Default)]
pub struct Services {
    /// The speech-recognition pool and the speech settings (None: speech off).
    pub speech: Option<(Arc<SpeechConfig>, Arc<AsrPool>)>,
    /// The image and text encoders (None: features off).
    pub features: Option<Arc<features::Encoders>>,
    /// The highlight model (None: highlight detection off).
    pub highlight: Option<Arc<highlight::HighlightService>>,
    /// The MMBee model (None: no gift prediction, samples only).
    pub mmbee: Option<Arc<crate::models::mmbee::MmbeeService>>,
    /// The user stage's copy of the `room-embeddings` table.
    pub room_table: Option<Arc<crate::sources::room_table::RoomTable>>,
    /// The compressed-interest model (None: sequences without interests).
    pub interests: Option<Arc<crate::models::interests::InterestModel>>,
}

/// Whether the room stage writes rooms' highlight scores to `room-embeddings`
/// (highlight detection runs, and the user stage's sequences read them).
pub fn writes_room_scores(config: &PipelineConfig, services: &Services) -> bool {
    services.features.is_some()
        && services.highlight.is_some()
        && config.operators.user_sequences.enabled
}

/// Whether the room stage writes anything to `room-embeddings`: rooms'
/// content (MMBee's fusion runs: content from the features' embeddings, and
/// a model) or highlight scores. With it, it writes its progress, which the
/// user stage's table then waits for.
pub fn writes_room_table(config: &PipelineConfig, services: &Services) -> bool {
    let content =
        config.operators.mmbee.enabled && services.features.is_some() && services.mmbee.is_some();
    content || writes_room_scores(config, services)
}

/// Builds the operators a pipeline enables, in the order they run.
pub fn build(
    config: &PipelineConfig,
    services: &Services,
) -> Result<Vec<Box<dyn Operator>>, ModelError> {
    let mut ops: Vec<Box<dyn Operator>> = Vec::new();
    if config.operators.room_activity.enabled {
        ops.push(Box::new(room_activity::RoomActivity::new(
            config.runtime.tick_ms,
        )));
    }
    if let Some((cfg, pool)) = &services.speech {
        ops.push(Box::new(speech::Speech::new(cfg.clone(), pool.clone())?));
    }
    // After speech: it reads the speech operator's notes.
    if let Some(enc) = &services.features {
        let mmbee = &config.operators.mmbee;
        ops.push(Box::new(
            features::Features::new(enc.clone()).with_embedding_notes(mmbee.enabled),
        ));
        // After features: these read their notes.
        if let Some(svc) = &services.highlight {
            ops.push(Box::new(
                highlight::Highlight::new(svc.clone())
                    .with_room_scores(writes_room_scores(config, services)),
            ));
        }
        let hl = &config.operators.highlight_labels;
        if hl.enabled {
            ops.push(Box::new(highlight_labels::HighlightLabels::new(
                Arc::new(hl.clone()),
                config.runtime.tick_ms,
            )));
        }
        if mmbee.enabled {
            let cfg = Arc::new(mmbee.clone());
            ops.push(Box::new(mmbee_content::MmbeeContent::new(cfg.clone())));
            // After the content operator: these read its notes.
            ops.push(Box::new(gift_labels::GiftLabels::new(cfg)));
            if let Some(svc) = &services.mmbee {
                ops.push(Box::new(mmbee_fusion::MmbeeFusion::new(svc.clone())));
            }
        }
    }
    if config.user_stage() {
        ops.push(Box::new(repartition::Repartition::new()));
    }
    Ok(ops)
}

/// Builds the user stage's operators (see [`crate::config::PipelineConfig::user_stage`]).
pub fn build_users(config: &PipelineConfig, services: &Services) -> Vec<Box<dyn Operator>> {
    let mut ops: Vec<Box<dyn Operator>> = Vec::new();
    let us = &config.operators.user_sequences;
    if us.enabled {
        ops.push(Box::new(
            user_sequences::UserSequences::new(Arc::new(us.clone()), services.room_table.clone())
                .with_interests(services.interests.clone()),
        ));
    }
    if let (Some(svc), Some(table)) = (&services.mmbee, &services.room_table) {
        ops.push(Box::new(
            gift_scoring::GiftScoring::new(svc.clone(), table.clone())
                .with_changelog_interval(config.operators.mmbee.changelog_interval_ms),
        ));
    }
    ops
}
