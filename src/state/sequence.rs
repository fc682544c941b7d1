//! One user's behaviour sequence, the user stage's state: the live rooms the
//! user watched and the short videos the user played, each with its owner,
//! times, watch time and feedback, bounded in length and age per domain; and
//! the real-time moment labels of the user's live visits.
//!
//! The sequence is defined as a fold ([`Fold`]) over the user's actions in
//! event-time order, ties broken by source position, so that it depends only
//! on the set of actions, never on how they arrived. [`UserState`] keeps that
//! fold incrementally in two parts: `base`, every action older than the
//! reorder horizon folded in, and `recent`, the raw actions after it. An
//! action newer than every recent one is folded straight into `current`; an
//! older one (late) is put in its place among the recent ones and `current`
//! is refolded from `base`. A delivery whose (time, source position) is
//! already among the recent ones is a replay and changes nothing. An action
//! older than the horizon can no longer be placed exactly: it is refused and
//! counted (replays of actions already folded into `base` end there too).
//!
//! Not for: I/O, encodings, or where rooms' content vectors and highlight
//! scores come from (the operator attaches them to the actions).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::interests::Interests;
use crate::models::interests::{dense as interest_features, InterestModel};
use crate::schema::{self as pb, ActionKind, ShortVideoAction, ShortVideoActionKind, ViewerAction};

/// An impression leads to the visit or play that follows it within this long.
pub const IMPRESSION_TTL_MS: i64 = 60_000;

/// Which domain a behaviour is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    /// A live room the user entered.
    Live,
    /// A short video the user played.
    ShortVideo,
}

impl Domain {
    /// Name used in records.
    pub fn name(self) -> &'static str {
        match self {
            Domain::Live => "live",
            Domain::ShortVideo => "short_video",
        }
    }
}

/// Feedback a behaviour can receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feedback {
    /// Entered or played right after an impression of it.
    Click,
    /// Watched at least the long-view time (short videos: or to the end).
    LongView,
    /// Liked.
    Like,
    /// Commented.
    Comment,
    /// Shared.
    Share,
    /// Followed the streamer or author.
    Follow,
    /// Sent a gift (live only).
    Gift,
}

impl Feedback {
    /// Every type, in bit order.
    pub const ALL: [Feedback; 7] = [
        Feedback::Click,
        Feedback::LongView,
        Feedback::Like,
        Feedback::Comment,
        Feedback::Share,
        Feedback::Follow,
        Feedback::Gift,
    ];
    /// Number of types.
    pub const COUNT: usize = 7;

    /// The type's bit in a feedback mask.
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// Name used in records.
    pub fn name(self) -> &'static str {
        match self {
            Feedback::Click => "click",
            Feedback::LongView => "long_view",
            Feedback::Like => "like",
            Feedback::Comment => "comment",
            Feedback::Share => "share",
            Feedback::Follow => "follow",
            Feedback::Gift => "gift",
        }
    }

    /// The names of the types in `mask`, in bit order.
    pub fn names(mask: u16) -> Vec<String> {
        Feedback::ALL
            .iter()
            .filter(|f| mask & f.bit() != 0)
            .map(|f| f.name().to_string())
            .collect()
    }
}

/// The feedback types a live visit is labelled with (the visit itself is
/// the click).
pub const LIVE_LABELS: u16 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6);

/// Where an action was read: two deliveries of one record share it, and it
/// orders actions with equal event times the same way on every run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    /// The stream (0: live actions, 1: short-video actions).
    pub stream: u8,
    /// Partition of the topic the action was first read from.
    pub partition: i32,
    /// Offset there.
    pub offset: i64,
}

impl Source {
    /// Sorts before every real source.
    pub const MIN: Source = Source {
        stream: 0,
        partition: i32::MIN,
        offset: i64::MIN,
    };
}

/// What an action does to the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The item was shown in a feed.
    Impression,
    /// Entered a live room.
    Enter,
    /// Watched a live room for `watch_ms` more.
    Watch,
    /// Left a live room.
    Leave,
    /// Played a short video (`watch_ms` of `duration_ms`).
    Play,
    /// Gave feedback.
    Feedback(Feedback),
}

/// One action of a user, with what the operator attached to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Act {
    /// Event time.
    pub time_ms: i64,
    /// Where it was read.
    pub source: Source,
    /// Domain.
    pub domain: Domain,
    /// Room or video.
    pub item: Arc<str>,
    /// Streamer or author (may be empty).
    pub owner: Arc<str>,
    /// What it does.
    pub step: Step,
    /// Watch time it reports.
    pub watch_ms: u32,
    /// Short videos: the video's length.
    pub duration_ms: u32,
    /// Gifts: value.
    pub gift_value: u64,
    /// Live entries: the room's highlight score then.
    pub highlight: Option<f32>,
    /// Live entries: the room's content vector then.
    pub content: Option<Arc<[f32]>>,
}

impl Act {
    /// What a live action kind does (None: nothing, e.g. unspecified).
    pub fn live_step(kind: ActionKind) -> Option<Step> {
        Some(match kind {
            ActionKind::Unspecified => return None,
            ActionKind::Impression => Step::Impression,
            ActionKind::Enter => Step::Enter,
            ActionKind::Leave => Step::Leave,
            ActionKind::WatchProgress => Step::Watch,
            ActionKind::Like => Step::Feedback(Feedback::Like),
            ActionKind::Comment => Step::Feedback(Feedback::Comment),
            ActionKind::Share => Step::Feedback(Feedback::Share),
            ActionKind::Follow => Step::Feedback(Feedback::Follow),
            ActionKind::Gift => Step::Feedback(Feedback::Gift),
        })
    }

    /// What a short-video action kind does.
    pub fn short_step(kind: ShortVideoActionKind) -> Option<Step> {
        Some(match kind {
            ShortVideoActionKind::Unspecified => return None,
            ShortVideoActionKind::Impression => Step::Impression,
            ShortVideoActionKind::Play => Step::Play,
            ShortVideoActionKind::Like => Step::Feedback(Feedback::Like),
            ShortVideoActionKind::Comment => Step::Feedback(Feedback::Comment),
            ShortVideoActionKind::Share => Step::Feedback(Feedback::Share),
            ShortVideoActionKind::Follow => Step::Feedback(Feedback::Follow),
        })
    }

    /// A live action as the sequence takes it, read at `source`, with the
    /// room's content vector (kept for entries only; the room's highlight
    /// score is the caller's to set, see [`Act::highlight`], as the one the
    /// action carries is ignored). None: a kind that does nothing.
    pub fn live(a: &ViewerAction, source: Source, content: Option<Arc<[f32]>>) -> Option<Act> {
        let step = Act::live_step(a.kind())?;
        let enter = step == Step::Enter;
        Some(Act {
            time_ms: a.event_time_ms,
            source,
            domain: Domain::Live,
            item: Arc::from(a.room_id.as_str()),
            owner: Arc::from(a.streamer_id.as_str()),
            step,
            watch_ms: a.watch_ms,
            duration_ms: 0,
            gift_value: a.gift_value,
            highlight: None,
            content: content.filter(|_| enter),
        })
    }

    /// A short-video action as the sequence takes it, read at `source`.
    pub fn short_video(s: &ShortVideoAction, source: Source) -> Option<Act> {
        Some(Act {
            time_ms: s.event_time_ms,
            source,
            domain: Domain::ShortVideo,
            item: Arc::from(s.video_id.as_str()),
            owner: Arc::from(s.author_id.as_str()),
            step: Act::short_step(s.kind())?,
            watch_ms: s.watch_ms,
            duration_ms: s.duration_ms,
            gift_value: 0,
            highlight: None,
            content: None,
        })
    }

    fn key(&self) -> (i64, Source) {
        (self.time_ms, self.source)
    }
}

/// How long sequences are kept, per domain, and how late an action may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Bounds {
    /// Live behaviours kept per user (the newest).
    pub live_max: usize,
    /// Live behaviours older than this (by start, against the user's newest
    /// action) are dropped (ms).
    pub live_max_age_ms: i64,
    /// Short-video behaviours kept per user.
    pub short_video_max: usize,
    /// Short-video behaviours older than this are dropped (ms).
    pub short_video_max_age_ms: i64,
    /// Watch time that makes a long view (ms).
    pub long_view_ms: i64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            live_max: 64,
            live_max_age_ms: 7 * 24 * 3_600_000,
            short_video_max: 128,
            short_video_max_age_ms: 7 * 24 * 3_600_000,
            long_view_ms: 30_000,
        }
    }
}

/// One behaviour in a sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Behaviour {
    /// Domain.
    pub domain: Domain,
    /// Room or video.
    pub item: Arc<str>,
    /// Streamer or author.
    pub owner: Arc<str>,
    /// Entered (live) or played (short video).
    pub start_ms: i64,
    /// Live: when the user left (None while inside).
    pub end_ms: Option<i64>,
    /// The impression that led to it.
    pub impression_ms: Option<i64>,
    /// Watch time.
    pub watch_ms: u64,
    /// Short videos: length.
    pub duration_ms: u32,
    /// Feedback received ([`Feedback::bit`] mask).
    pub feedback: u16,
    /// When each feedback type first occurred (i64::MAX: not yet).
    pub first_ms: [i64; Feedback::COUNT],
    /// Gifts' total value.
    pub gift_value: u64,
    /// Live: the room's highlight score at entry.
    pub highlight: Option<f32>,
    /// Live: the room's content vector at entry.
    pub content: Option<Arc<[f32]>>,
}

impl Behaviour {
    fn new(act: &Act) -> Self {
        Behaviour {
            domain: act.domain,
            item: act.item.clone(),
            owner: act.owner.clone(),
            start_ms: act.time_ms,
            end_ms: None,
            impression_ms: None,
            watch_ms: 0,
            duration_ms: 0,
            feedback: 0,
            first_ms: [i64::MAX; Feedback::COUNT],
            gift_value: 0,
            highlight: act.highlight,
            content: act.content.clone(),
        }
    }

    fn mark(&mut self, f: Feedback, t: i64) {
        let slot = &mut self.first_ms[f as usize];
        if *slot == i64::MAX {
            *slot = t;
            self.feedback |= f.bit();
        }
    }

    /// When `f` first occurred.
    pub fn first(&self, f: Feedback) -> Option<i64> {
        Some(self.first_ms[f as usize]).filter(|&t| t != i64::MAX)
    }
}

/// One domain's behaviours, oldest first, numbered from `first`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Lane {
    items: VecDeque<Behaviour>,
    first: u64,
}

impl Lane {
    fn push(&mut self, b: Behaviour) -> u64 {
        self.items.push_back(b);
        self.first.saturating_add(self.items.len() as u64 - 1)
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Behaviour> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.items.get_mut(i)
    }

    /// Drops the oldest beyond `max` or older than `oldest_ms`; calls
    /// `gone` with each dropped one's number and item.
    fn evict(&mut self, max: usize, oldest_ms: i64, mut gone: impl FnMut(u64, &Arc<str>)) {
        while let Some(front) = self.items.front() {
            if self.items.len() <= max && front.start_ms >= oldest_ms {
                break;
            }
            gone(self.first, &front.item);
            self.items.pop_front();
            self.first = self.first.saturating_add(1);
        }
    }
}

/// The sequence as a fold over actions in (event time, source) order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fold {
    live: Lane,
    short: Lane,
    /// Live rooms the user is inside: room -> the visit's number.
    open: HashMap<Arc<str>, u64>,
    /// Each video's latest play.
    plays: HashMap<Arc<str>, u64>,
    /// Impressions not yet followed by a visit or play.
    shown: HashMap<(Domain, Arc<str>), i64>,
    /// Newest event time folded in.
    newest_ms: i64,
    /// The compressed interests of every behaviour folded in (None: no
    /// interest model).
    interests: Option<Interests>,
}

impl Fold {
    /// An empty sequence that keeps compressed interests with `model`.
    pub fn with_interests(model: Option<Arc<InterestModel>>) -> Self {
        Fold {
            interests: model.map(Interests::new),
            ..Fold::default()
        }
    }

    /// The compressed interests (None: no interest model).
    pub fn interests(&self) -> Option<&Interests> {
        self.interests.as_ref()
    }

    /// Pushes a new behaviour onto its lane; its number there.
    fn push(&mut self, b: Behaviour) -> u64 {
        if let Some(i) = self.interests.as_mut() {
            i.add(&b);
        }
        match b.domain {
            Domain::Live => self.live.push(b),
            Domain::ShortVideo => self.short.push(b),
        }
    }

    /// Folds one action in (actions must come in (time, source) order).
    pub fn apply(&mut self, act: &Act, bounds: &Bounds) {
        self.newest_ms = self.newest_ms.max(act.time_ms);
        let t = act.time_ms;
        match (act.domain, act.step) {
            (d, Step::Impression) => {
                self.shown.insert((d, act.item.clone()), t);
                if self.shown.len() > 64 {
                    let newest = self.newest_ms;
                    self.shown.retain(|_, s| newest - *s <= IMPRESSION_TTL_MS);
                }
            }
            (Domain::Live, Step::Enter) => {
                self.leave(&act.item, t);
                let mut b = Behaviour::new(act);
                b.impression_ms = self.impression(Domain::Live, &act.item, t);
                if b.impression_ms.is_some() {
                    b.mark(Feedback::Click, t);
                }
                let seq = self.push(b);
                self.open.insert(act.item.clone(), seq);
            }
            (Domain::Live, Step::Leave) => self.leave(&act.item, t),
            (Domain::Live, Step::Watch) => {
                let long = bounds.long_view_ms;
                self.visit(act, |b| {
                    b.watch_ms = b.watch_ms.saturating_add(u64::from(act.watch_ms));
                    if b.watch_ms as i64 >= long {
                        b.mark(Feedback::LongView, t);
                    }
                });
            }
            (Domain::Live, Step::Feedback(f)) => self.visit(act, |b| {
                b.mark(f, t);
                if f == Feedback::Gift {
                    b.gift_value = b.gift_value.saturating_add(act.gift_value);
                }
            }),
            (Domain::ShortVideo, Step::Play) => {
                let mut b = Behaviour::new(act);
                b.impression_ms = self.impression(Domain::ShortVideo, &act.item, t);
                if b.impression_ms.is_some() {
                    b.mark(Feedback::Click, t);
                }
                b.watch_ms = u64::from(act.watch_ms);
                b.duration_ms = act.duration_ms;
                let full = act.duration_ms > 0 && act.watch_ms >= act.duration_ms;
                if full || i64::from(act.watch_ms) >= bounds.long_view_ms {
                    b.mark(Feedback::LongView, t);
                }
                let seq = self.push(b);
                self.plays.insert(act.item.clone(), seq);
            }
            (Domain::ShortVideo, Step::Feedback(f)) => {
                let played = self.plays.get(&act.item).copied();
                match played.and_then(|s| self.short.get_mut(s)) {
                    Some(b) => change(&mut self.interests, b, |b| b.mark(f, t)),
                    None => {
                        let mut b = Behaviour::new(act);
                        b.mark(f, t);
                        let seq = self.push(b);
                        self.plays.insert(act.item.clone(), seq);
                    }
                }
            }
            // Not produced by the conversions above.
            (Domain::Live, Step::Play) | (Domain::ShortVideo, _) => {}
        }
        self.evict(bounds);
    }

    fn impression(&mut self, d: Domain, item: &Arc<str>, t: i64) -> Option<i64> {
        self.shown
            .remove(&(d, item.clone()))
            .filter(|&s| t - s <= IMPRESSION_TTL_MS)
    }

    fn leave(&mut self, room: &Arc<str>, t: i64) {
        if let Some(seq) = self.open.remove(room) {
            if let Some(b) = self.live.get_mut(seq) {
                b.end_ms = Some(t);
            }
        }
    }

    /// Runs `f` on the visit the live action belongs to: the open one in
    /// its room, or one it starts (its entry was never seen).
    fn visit(&mut self, act: &Act, f: impl FnOnce(&mut Behaviour)) {
        let seq = match self.open.get(&act.item) {
            Some(&seq) => seq,
            None => {
                let seq = self.push(Behaviour::new(act));
                self.open.insert(act.item.clone(), seq);
                seq
            }
        };
        if let Some(b) = self.live.get_mut(seq) {
            change(&mut self.interests, b, f);
        }
    }

    fn evict(&mut self, bounds: &Bounds) {
        let newest = self.newest_ms;
        let open = &mut self.open;
        self.live.evict(
            bounds.live_max,
            newest.saturating_sub(bounds.live_max_age_ms),
            |seq, item| {
                if open.get(item) == Some(&seq) {
                    open.remove(item);
                }
            },
        );
        let plays = &mut self.plays;
        self.short.evict(
            bounds.short_video_max,
            newest.saturating_sub(bounds.short_video_max_age_ms),
            |seq, item| {
                if plays.get(item) == Some(&seq) {
                    plays.remove(item);
                }
            },
        );
    }

    /// Live behaviours, oldest first.
    pub fn live(&self) -> impl Iterator<Item = &Behaviour> {
        self.live.items.iter()
    }

    /// Short-video behaviours, oldest first.
    pub fn short_videos(&self) -> impl Iterator<Item = &Behaviour> {
        self.short.items.iter()
    }

    /// Both domains merged by start time (live first on ties).
    pub fn behaviours(&self) -> Vec<&Behaviour> {
        let mut all: Vec<&Behaviour> = self.live().chain(self.short_videos()).collect();
        all.sort_by_key(|b| (b.start_ms, b.domain));
        all
    }

    /// Newest event time folded in.
    pub fn newest_ms(&self) -> i64 {
        self.newest_ms
    }

    /// Live rooms the user is inside.
    pub fn inside(&self) -> usize {
        self.open.len()
    }
}

/// Runs `f` on a behaviour already in the sequence, replacing its interest
/// term when its features changed.
fn change(interests: &mut Option<Interests>, b: &mut Behaviour, f: impl FnOnce(&mut Behaviour)) {
    match interests {
        None => f(b),
        Some(i) => {
            let before = interest_features(b);
            f(b);
            i.changed(&before, b);
        }
    }
}

/// What applying an action did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The sequence took it.
    Changed,
    /// The same delivery was already taken (a replay).
    Duplicate,
    /// Older than the reorder horizon: refused.
    TooLate,
}

/// Reporting progress of one live visit's moment labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Reported {
    /// Types already reported (positive or negative).
    mask: u16,
    /// Report periods already closed.
    periods: u32,
}

/// One moment-label report of a live visit: the feedback types first seen
/// in a report period (positives), and at leave also every type never seen
/// (negatives).
#[derive(Clone, Debug, PartialEq)]
pub struct LabelReport {
    /// The room.
    pub room: Arc<str>,
    /// Its streamer.
    pub streamer: Arc<str>,
    /// When the visit started.
    pub visit_start_ms: i64,
    /// Event time of the report: a period's end, or the leave.
    pub at_ms: i64,
    /// Types first seen since the last report.
    pub positives: u16,
    /// At leave: types never seen in the visit.
    pub negatives: u16,
    /// Whether this is the visit's last report (the user left).
    pub at_leave: bool,
    /// The visit as it stands at the report.
    pub visit: Behaviour,
}

/// One user's state: the sequence fold kept incrementally (see the module
/// comment) and the moment-label progress of the user's live visits.
#[derive(Clone, Debug, PartialEq)]
pub struct UserState {
    /// Fold of every action before `horizon_ms` (None: equal to `current`,
    /// there are no recent actions).
    base: Option<Fold>,
    /// Actions at or after `horizon_ms`, raw, in fold order.
    recent: BTreeMap<(i64, Source), Act>,
    /// Fold of everything: `base` then `recent`.
    current: Fold,
    /// Actions before this are refused.
    horizon_ms: i64,
    /// Moment-label progress per live visit (start, room).
    reported: BTreeMap<(i64, Arc<str>), Reported>,
    /// No moment label is due before this (i64::MAX: none will be until an
    /// action comes).
    label_due_ms: i64,
    /// The tick end of the last snapshot published from this state (kept
    /// by the operator; i64::MIN: none).
    pub published_as_of_ms: i64,
}

impl Default for UserState {
    fn default() -> Self {
        UserState::new()
    }
}

impl UserState {
    /// An empty state without compressed interests.
    pub fn new() -> Self {
        UserState::with_interests(None)
    }

    /// An empty state that keeps compressed interests with `model`.
    pub fn with_interests(model: Option<Arc<InterestModel>>) -> Self {
        UserState {
            base: None,
            recent: BTreeMap::new(),
            current: Fold::with_interests(model),
            horizon_ms: i64::MIN,
            reported: BTreeMap::new(),
            label_due_ms: i64::MIN,
            published_as_of_ms: i64::MIN,
        }
    }

    /// Takes one delivered action.
    pub fn apply(&mut self, act: Act, bounds: &Bounds) -> Applied {
        if act.time_ms < self.horizon_ms {
            return Applied::TooLate;
        }
        let key = act.key();
        if self.recent.contains_key(&key) {
            return Applied::Duplicate;
        }
        if self.base.is_none() {
            self.base = Some(self.current.clone());
        }
        if act.domain == Domain::Live {
            self.label_due_ms = i64::MIN;
        }
        let in_order = self.recent.last_key_value().is_none_or(|(k, _)| key > *k);
        if in_order {
            self.current.apply(&act, bounds);
            self.recent.insert(key, act);
        } else {
            self.recent.insert(key, act);
            let mut f = self.base.clone().unwrap_or_default();
            for a in self.recent.values() {
                f.apply(a, bounds);
            }
            self.current = f;
        }
        Applied::Changed
    }

    /// Moves the horizon to `horizon_ms`: the actions before it are folded
    /// into the base and forgotten, and later ones older than it refused.
    pub fn advance(&mut self, horizon_ms: i64, bounds: &Bounds) {
        if horizon_ms <= self.horizon_ms {
            return;
        }
        self.horizon_ms = horizon_ms;
        let keep = self.recent.split_off(&(horizon_ms, Source::MIN));
        let done = std::mem::replace(&mut self.recent, keep);
        if self.recent.is_empty() {
            self.base = None;
        } else if let Some(base) = self.base.as_mut() {
            for a in done.values() {
                base.apply(a, bounds);
            }
        }
    }

    /// The sequence now.
    pub fn current(&self) -> &Fold {
        &self.current
    }

    /// Raw actions kept after the horizon.
    pub fn recent(&self) -> usize {
        self.recent.len()
    }

    /// Actions before this are refused.
    pub fn horizon_ms(&self) -> i64 {
        self.horizon_ms
    }

    /// Whether a later [`UserState::labels`] call may report anything (a
    /// live visit is not fully reported yet).
    pub fn labelling(&self) -> bool {
        self.label_due_ms != i64::MAX
    }

    /// The moment-label reports due at `watermark_ms` (no action before it
    /// will come in order any more): every `period_ms` after a visit's
    /// start, the types first seen in that period, once each; at the
    /// leave, the rest of the positives and, as negatives, every type the
    /// visit never got.
    pub fn labels(&mut self, watermark_ms: i64, period_ms: i64) -> Vec<LabelReport> {
        let mut out = Vec::new();
        if watermark_ms < self.label_due_ms {
            return out;
        }
        let period_ms = period_ms.max(1);
        let mut due = i64::MAX;
        for b in self.current.live.items.iter() {
            let r = self
                .reported
                .entry((b.start_ms, b.item.clone()))
                .or_default();
            if r.mask == LIVE_LABELS {
                continue;
            }
            let seen = b.feedback & LIVE_LABELS;
            let mut report = |at_ms: i64, positives: u16, negatives: u16, at_leave: bool| {
                out.push(LabelReport {
                    room: b.item.clone(),
                    streamer: b.owner.clone(),
                    visit_start_ms: b.start_ms,
                    at_ms,
                    positives,
                    negatives,
                    at_leave,
                    visit: b.clone(),
                })
            };
            // Periods closed by the watermark and before the leave.
            let mut closed = (watermark_ms.saturating_sub(b.start_ms) / period_ms).max(0);
            if let Some(e) = b.end_ms {
                closed = closed.min((e - b.start_ms) / period_ms);
            }
            if closed > i64::from(r.periods) {
                let mut due: BTreeMap<i64, u16> = BTreeMap::new();
                for f in Feedback::ALL {
                    if seen & !r.mask & f.bit() == 0 {
                        continue;
                    }
                    let k = b.first_ms[f as usize].saturating_sub(b.start_ms).max(0) / period_ms;
                    if k < closed {
                        *due.entry(k).or_default() |= f.bit();
                    }
                }
                for (k, mask) in due {
                    report(b.start_ms + period_ms * (k + 1), mask, 0, false);
                    r.mask |= mask;
                }
                r.periods = u32::try_from(closed).unwrap_or(u32::MAX);
            }
            if let Some(e) = b.end_ms.filter(|&e| e <= watermark_ms) {
                let positives = seen & !r.mask;
                let negatives = LIVE_LABELS & !seen & !r.mask;
                report(e, positives, negatives, true);
                r.mask = LIVE_LABELS;
            }
            if r.mask != LIVE_LABELS {
                due = due.min(b.start_ms + period_ms * (i64::from(r.periods) + 1));
                if let Some(e) = b.end_ms {
                    due = due.min(e);
                }
            }
        }
        self.label_due_ms = due;
        // Forget visits that left the sequence.
        if let Some(oldest) = self.current.live.items.front().map(|b| b.start_ms) {
            self.reported = self.reported.split_off(&(oldest, Arc::from("")));
        }
        out
    }
}

// ------------------------------------------------------------------ changelog codec

/// Why a changelog record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum StateDecodeError {
    /// Not a `UserStateRecord`.
    #[error("not a user state record: {0}")]
    Proto(#[from] prost::DecodeError),
    /// Written by an engine with another layout.
    #[error("user state record version {0}, this engine reads {STATE_VERSION}")]
    Version(u32),
    /// A field out of range.
    #[error("bad user state record: {0}")]
    Field(&'static str),
}

/// Version of the changelog layout.
pub const STATE_VERSION: u32 = 1;

/// Event times a record may carry (about ±35,000 years around the epoch):
/// arithmetic on them cannot overflow.
const TIME_RANGE: std::ops::RangeInclusive<i64> = -(1 << 50)..=(1 << 50);

fn time(t: i64, what: &'static str) -> Result<i64, StateDecodeError> {
    if TIME_RANGE.contains(&t) {
        Ok(t)
    } else {
        Err(StateDecodeError::Field(what))
    }
}

fn step_code(s: Step) -> u32 {
    match s {
        Step::Impression => 0,
        Step::Enter => 1,
        Step::Watch => 2,
        Step::Leave => 3,
        Step::Play => 4,
        Step::Feedback(f) => 10 + f as u32,
    }
}

fn step_of(code: u32) -> Option<Step> {
    Some(match code {
        0 => Step::Impression,
        1 => Step::Enter,
        2 => Step::Watch,
        3 => Step::Leave,
        4 => Step::Play,
        c => Step::Feedback(*Feedback::ALL.get(usize::try_from(c.checked_sub(10)?).ok()?)?),
    })
}

fn domain_of(short_video: bool) -> Domain {
    if short_video {
        Domain::ShortVideo
    } else {
        Domain::Live
    }
}

fn content_of(has: bool, v: Vec<f32>) -> Option<Arc<[f32]>> {
    has.then(|| v.into())
}

fn behaviour_to(b: &Behaviour) -> pb::SequenceBehaviour {
    pb::SequenceBehaviour {
        short_video: b.domain == Domain::ShortVideo,
        item: b.item.to_string(),
        owner: b.owner.to_string(),
        start_ms: b.start_ms,
        end_ms: b.end_ms,
        impression_ms: b.impression_ms,
        watch_ms: b.watch_ms,
        duration_ms: b.duration_ms,
        feedback: u32::from(b.feedback),
        first_ms: b.first_ms.to_vec(),
        gift_value: b.gift_value,
        highlight: b.highlight,
        has_content: b.content.is_some(),
        content: b
            .content
            .as_deref()
            .map(<[f32]>::to_vec)
            .unwrap_or_default(),
    }
}

fn behaviour_from(r: pb::SequenceBehaviour) -> Result<Behaviour, StateDecodeError> {
    time(r.start_ms, "start_ms")?;
    if let Some(t) = r.end_ms {
        time(t, "end_ms")?;
    }
    if let Some(t) = r.impression_ms {
        time(t, "impression_ms")?;
    }
    if r.first_ms
        .iter()
        .any(|&t| t != i64::MAX && !TIME_RANGE.contains(&t))
    {
        return Err(StateDecodeError::Field("first_ms"));
    }
    Ok(Behaviour {
        domain: domain_of(r.short_video),
        item: r.item.into(),
        owner: r.owner.into(),
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        impression_ms: r.impression_ms,
        watch_ms: r.watch_ms,
        duration_ms: r.duration_ms,
        feedback: u16::try_from(r.feedback).map_err(|_| StateDecodeError::Field("feedback"))?,
        first_ms: r
            .first_ms
            .try_into()
            .map_err(|_| StateDecodeError::Field("first_ms"))?,
        gift_value: r.gift_value,
        highlight: r.highlight,
        content: content_of(r.has_content, r.content),
    })
}

fn fold_to(f: &Fold) -> pb::SequenceFold {
    let slots = |m: &HashMap<Arc<str>, u64>| {
        let mut v: Vec<pb::SequenceSlot> = m
            .iter()
            .map(|(k, &seq)| pb::SequenceSlot {
                item: k.to_string(),
                seq,
            })
            .collect();
        v.sort_by(|a, b| a.item.cmp(&b.item));
        v
    };
    let mut shown: Vec<pb::SequenceShown> = f
        .shown
        .iter()
        .map(|((d, item), &t)| pb::SequenceShown {
            short_video: *d == Domain::ShortVideo,
            item: item.to_string(),
            time_ms: t,
        })
        .collect();
    shown.sort_by(|a, b| (a.short_video, &a.item).cmp(&(b.short_video, &b.item)));
    pb::SequenceFold {
        live: f.live.items.iter().map(behaviour_to).collect(),
        live_first: f.live.first,
        short_videos: f.short.items.iter().map(behaviour_to).collect(),
        short_first: f.short.first,
        open: slots(&f.open),
        plays: slots(&f.plays),
        shown,
        newest_ms: f.newest_ms,
        interest_sums: f
            .interests
            .as_ref()
            .map(|i| i.sums().to_vec())
            .unwrap_or_default(),
        interest_count: f.interests.as_ref().map_or(0, |i| i.count()),
        interest_model: f
            .interests
            .as_ref()
            .map(|i| i.model().label().to_string())
            .unwrap_or_default(),
    }
}

/// Reads a fold back; its interests with `model`: the recorded sums when the
/// same model version wrote them, else (another version, or none) the terms
/// of the behaviours the sequence still holds, as a model rollout starts.
fn fold_from(
    r: pb::SequenceFold,
    model: Option<&Arc<InterestModel>>,
) -> Result<Fold, StateDecodeError> {
    let lane = |items: Vec<pb::SequenceBehaviour>, first: u64| -> Result<Lane, StateDecodeError> {
        Ok(Lane {
            items: items
                .into_iter()
                .map(behaviour_from)
                .collect::<Result<_, _>>()?,
            first,
        })
    };
    let slots = |v: Vec<pb::SequenceSlot>| {
        v.into_iter()
            .map(|s| (Arc::<str>::from(s.item), s.seq))
            .collect::<HashMap<_, _>>()
    };
    let mut fold = Fold {
        live: lane(r.live, r.live_first)?,
        short: lane(r.short_videos, r.short_first)?,
        open: slots(r.open),
        plays: slots(r.plays),
        shown: r
            .shown
            .into_iter()
            .map(|s| {
                Ok((
                    (domain_of(s.short_video), Arc::from(s.item)),
                    time(s.time_ms, "shown")?,
                ))
            })
            .collect::<Result<_, StateDecodeError>>()?,
        newest_ms: r.newest_ms,
        interests: None,
    };
    if let Some(m) = model {
        fold.interests = Interests::restore(
            m.clone(),
            &r.interest_model,
            r.interest_sums,
            r.interest_count,
        )
        .or_else(|| {
            let mut fresh = Interests::new(m.clone());
            for b in fold.live.items.iter().chain(&fold.short.items) {
                fresh.add(b);
            }
            Some(fresh)
        });
    }
    Ok(fold)
}

fn act_to(a: &Act) -> pb::SequenceAct {
    pb::SequenceAct {
        time_ms: a.time_ms,
        stream: u32::from(a.source.stream),
        partition: a.source.partition,
        offset: a.source.offset,
        short_video: a.domain == Domain::ShortVideo,
        item: a.item.to_string(),
        owner: a.owner.to_string(),
        step: step_code(a.step),
        watch_ms: a.watch_ms,
        duration_ms: a.duration_ms,
        gift_value: a.gift_value,
        highlight: a.highlight,
        has_content: a.content.is_some(),
        content: a
            .content
            .as_deref()
            .map(<[f32]>::to_vec)
            .unwrap_or_default(),
    }
}

fn act_from(r: pb::SequenceAct) -> Result<Act, StateDecodeError> {
    Ok(Act {
        time_ms: time(r.time_ms, "time_ms")?,
        source: Source {
            stream: u8::try_from(r.stream).map_err(|_| StateDecodeError::Field("stream"))?,
            partition: r.partition,
            offset: r.offset,
        },
        domain: domain_of(r.short_video),
        item: r.item.into(),
        owner: r.owner.into(),
        step: step_of(r.step).ok_or(StateDecodeError::Field("step"))?,
        watch_ms: r.watch_ms,
        duration_ms: r.duration_ms,
        gift_value: r.gift_value,
        highlight: r.highlight,
        content: content_of(r.has_content, r.content),
    })
}

impl UserState {
    /// The state as its changelog record: the fold before the horizon and
    /// the raw actions after it (the current fold is recomputed on restore).
    pub fn to_record(&self) -> pb::UserStateRecord {
        pb::UserStateRecord {
            schema_version: STATE_VERSION,
            fold: Some(fold_to(self.base.as_ref().unwrap_or(&self.current))),
            recent: self.recent.values().map(act_to).collect(),
            horizon_ms: self.horizon_ms,
            reported: self
                .reported
                .iter()
                .map(|((start, room), r)| pb::VisitLabels {
                    start_ms: *start,
                    room: room.to_string(),
                    mask: u32::from(r.mask),
                    periods: r.periods,
                })
                .collect(),
            label_due_ms: self.label_due_ms,
            published_as_of_ms: self.published_as_of_ms,
        }
    }

    /// Reads a changelog record back, keeping compressed interests with
    /// `interests` (see [`Fold::with_interests`]).
    pub fn from_record(
        r: pb::UserStateRecord,
        bounds: &Bounds,
        interests: Option<&Arc<InterestModel>>,
    ) -> Result<Self, StateDecodeError> {
        if r.schema_version != STATE_VERSION {
            return Err(StateDecodeError::Version(r.schema_version));
        }
        let base = fold_from(r.fold.unwrap_or_default(), interests)?;
        let recent: BTreeMap<(i64, Source), Act> = r
            .recent
            .into_iter()
            .map(|a| act_from(a).map(|a| (a.key(), a)))
            .collect::<Result<_, _>>()?;
        let (base, current) = if recent.is_empty() {
            (None, base)
        } else {
            let mut current = base.clone();
            for a in recent.values() {
                current.apply(a, bounds);
            }
            (Some(base), current)
        };
        let reported = r
            .reported
            .into_iter()
            .map(|v| {
                let mask = u16::try_from(v.mask).map_err(|_| StateDecodeError::Field("mask"))?;
                Ok((
                    (time(v.start_ms, "reported")?, Arc::<str>::from(v.room)),
                    Reported {
                        mask,
                        periods: v.periods,
                    },
                ))
            })
            .collect::<Result<_, StateDecodeError>>()?;
        Ok(UserState {
            base,
            recent,
            current,
            horizon_ms: r.horizon_ms,
            reported,
            label_due_ms: r.label_due_ms,
            published_as_of_ms: r.published_as_of_ms,
        })
    }

    /// The state's changelog value.
    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.to_record())
    }

    /// Reads a changelog value back (see [`UserState::from_record`]).
    pub fn decode(
        bytes: &[u8],
        bounds: &Bounds,
        interests: Option<&Arc<InterestModel>>,
    ) -> Result<Self, StateDecodeError> {
        Self::from_record(prost::Message::decode(bytes)?, bounds, interests)
    }
}

/// Rebuilds a sequence from scratch: every distinct delivery (by time and
/// source) folded in event-time order. The reference the incremental state
/// is tested against, with compressed interests when `interests` is a model.
pub fn rebuild<'a>(
    acts: impl IntoIterator<Item = &'a Act>,
    bounds: &Bounds,
    interests: Option<&Arc<InterestModel>>,
) -> Fold {
    let sorted: BTreeMap<(i64, Source), &Act> = acts.into_iter().map(|a| (a.key(), a)).collect();
    let mut f = Fold::with_interests(interests.cloned());
    for a in sorted.values() {
        f.apply(a, bounds);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(t: i64, off: i64, room: &str, step: Step) -> Act {
        Act {
            time_ms: t,
            source: Source {
                stream: 0,
                partition: 0,
                offset: off,
            },
            domain: Domain::Live,
            item: room.into(),
            owner: format!("s-{room}").into(),
            step,
            watch_ms: if step == Step::Watch { 5_000 } else { 0 },
            duration_ms: 0,
            gift_value: if step == Step::Feedback(Feedback::Gift) {
                10
            } else {
                0
            },
            highlight: None,
            content: None,
        }
    }

    #[test]
    fn a_visit_collects_its_watch_time_and_feedback() {
        let b = Bounds::default();
        let mut s = UserState::new();
        let acts = [
            live(1_000, 1, "r1", Step::Impression),
            live(2_000, 2, "r1", Step::Enter),
            live(7_000, 3, "r1", Step::Watch),
            live(8_000, 4, "r1", Step::Feedback(Feedback::Like)),
            live(9_000, 5, "r1", Step::Feedback(Feedback::Gift)),
            live(9_500, 6, "r1", Step::Feedback(Feedback::Gift)),
            live(12_000, 7, "r1", Step::Watch),
            live(12_000, 8, "r1", Step::Leave),
        ];
        for a in acts {
            assert_eq!(s.apply(a, &b), Applied::Changed);
        }
        let seq = s.current().behaviours();
        assert_eq!(seq.len(), 1);
        let v = seq[0];
        assert_eq!(
            (v.start_ms, v.end_ms, v.watch_ms),
            (2_000, Some(12_000), 10_000)
        );
        assert_eq!(v.impression_ms, Some(1_000));
        assert_eq!(
            Feedback::names(v.feedback),
            ["click", "like", "gift"].map(String::from)
        );
        assert_eq!(v.gift_value, 20);
        assert_eq!(v.first(Feedback::Gift), Some(9_000));
    }

    #[test]
    fn replays_change_nothing_and_too_late_actions_are_refused() {
        let b = Bounds::default();
        let mut s = UserState::new();
        let a = live(5_000, 1, "r", Step::Enter);
        assert_eq!(s.apply(a.clone(), &b), Applied::Changed);
        assert_eq!(s.apply(a.clone(), &b), Applied::Duplicate);
        s.advance(6_000, &b);
        assert_eq!(s.recent(), 0);
        assert_eq!(s.apply(a, &b), Applied::TooLate);
        assert_eq!(s.current().behaviours().len(), 1);
    }

    #[test]
    fn bounds_keep_the_newest_and_the_youngest() {
        let b = Bounds {
            live_max: 2,
            live_max_age_ms: 100_000,
            ..Bounds::default()
        };
        let mut s = UserState::new();
        for (i, t) in [0i64, 10_000, 20_000, 200_000].into_iter().enumerate() {
            s.apply(live(t, i as i64, &format!("r{i}"), Step::Enter), &b);
        }
        let starts: Vec<i64> = s.current().live().map(|v| v.start_ms).collect();
        // Count keeps two; age then drops the one started 190 s before the newest.
        assert_eq!(starts, [200_000]);
    }

    #[test]
    fn moment_labels_report_each_type_once_and_negatives_at_leave() {
        let b = Bounds::default();
        let mut s = UserState::new();
        for a in [
            live(0, 1, "r", Step::Enter),
            live(5_000, 2, "r", Step::Feedback(Feedback::Like)),
            live(20_000, 3, "r", Step::Feedback(Feedback::Like)),
            live(31_000, 4, "r", Step::Feedback(Feedback::Comment)),
            live(40_000, 5, "r", Step::Feedback(Feedback::Like)),
            live(70_000, 6, "r", Step::Leave),
        ] {
            s.apply(a, &b);
        }
        // Nothing is due before the first period closes.
        assert!(s.labels(29_999, 30_000).is_empty());
        let first = s.labels(30_000, 30_000);
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].at_ms, first[0].positives),
            (30_000, Feedback::Like.bit())
        );
        // The second period: the comment, not the like again.
        let second = s.labels(60_000, 30_000);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].positives, Feedback::Comment.bit());
        // At leave: no new positives; the rest are negatives, at the leave's time.
        let last = s.labels(100_000, 30_000);
        assert_eq!(last.len(), 1);
        assert!(last[0].at_leave);
        assert_eq!(last[0].at_ms, 70_000);
        assert_eq!(last[0].positives, 0);
        assert_eq!(
            last[0].negatives,
            LIVE_LABELS & !Feedback::Like.bit() & !Feedback::Comment.bit()
        );
        assert!(s.labels(200_000, 30_000).is_empty());
        assert!(!s.labelling());
    }
}
