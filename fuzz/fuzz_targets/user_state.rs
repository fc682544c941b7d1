//! The user stage's changelog record decoder on arbitrary bytes: a record it
//! accepts can be taken on with (actions, labels, the horizon, encoding
//! again) without panicking.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use onair::state::sequence::{Act, Bounds, Domain, Feedback, Source, Step, UserState};

fuzz_target!(|data: &[u8]| {
    let bounds = Bounds::default();
    let Ok(mut state) = UserState::decode(data, &bounds, None) else {
        return;
    };
    let newest = state.current().newest_ms();
    for (i, step) in [Step::Enter, Step::Watch, Step::Feedback(Feedback::Gift), Step::Leave]
        .into_iter()
        .enumerate()
    {
        let _ = state.apply(
            Act {
                time_ms: newest.saturating_add(i as i64).clamp(-(1 << 50), 1 << 50),
                source: Source {
                    stream: 0,
                    partition: 0,
                    offset: i as i64,
                },
                domain: Domain::Live,
                item: Arc::from("room"),
                owner: Arc::from("streamer"),
                step,
                watch_ms: u32::MAX,
                duration_ms: 0,
                gift_value: u64::MAX,
                highlight: None,
                content: None,
            },
            &bounds,
        );
    }
    let _ = state.labels(newest.saturating_add(60_000).clamp(-(1 << 50), 1 << 50), 30_000);
    state.advance(newest.clamp(-(1 << 50), 1 << 50), &bounds);
    let _ = UserState::decode(&state.encode(), &bounds, None);
});
