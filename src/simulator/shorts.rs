//! The short-video feed of the simulated world (with
//! [`SimConfig::short_videos`](super::SimConfig::short_videos)): the rooms'
//! viewers also scroll short videos when they are not watching live, so the
//! user stage sees one user's behaviour across both domains.
//!
//! What it is for: generating `short-video-actions` (IMPRESSION, PLAY, LIKE,
//! COMMENT, SHARE, FOLLOW) for the users the live rooms already have, linked
//! to the live side through the streamers (who also post videos) and the
//! users' live visits (nobody scrolls while inside a room).
//!
//! What it is not for: the live rooms themselves (that is [`super::world`],
//! which this module never influences: it draws only from its own random
//! streams and reads the visits the rooms generated), or ground truth (the
//! truth of the rooms ignores these actions).
//!
//! # The model
//!
//! * **Users** are every user in some room's population (`user-NNNNNN`, the
//!   rooms' own viewers and the shared pool alike). Each alternates idle
//!   stretches (exponential, mean 9 min) with scrolling sessions (exponential,
//!   mean 3 min, at least 20 s), so about a quarter scroll at any time; at the
//!   start each user is mid-session with that probability.
//! * **Feed items.** In a session a user sees one video after another. Each
//!   item is an IMPRESSION; it is played (PLAY 150–900 ms later) with a
//!   probability `0.35 + 0.6 x interest` (about 60% overall); a PLAY carries
//!   the video's length and the watch time: the whole video with probability
//!   `0.15 + 0.4 x interest`, otherwise 0.8 s plus an exponential part, less
//!   than the length. After a play the user may LIKE (10%), COMMENT (3%),
//!   SHARE (2%) or FOLLOW (1%, once per author) at those base rates times
//!   `0.3 + 1.75 x interest` (about 1 on average), at times within the
//!   watch. The next item comes 0.2–1.5 s after the video is left (0.4–2.5 s
//!   of looking when it was not played): one impression every 5–15 s.
//! * **Authors.** Each room's streamer posts videos, and so do
//!   short-video-only creators (`author-NNNNN`, one per 8 users, at least 20,
//!   each of a genre). A feed item is one of the user's rooms' streamers with
//!   probability `0.1 + 0.35 x` the user's highest affinity (picked in
//!   proportion to affinity, and the affinity is the interest: fans see and
//!   like their streamers' videos), any streamer with probability 0.08
//!   (interest: the affinity if the user is in that room, else 0.3 for a
//!   streamer of the user's genre and 0.1 for another),
//!   otherwise a creator, of the user's genre 60% of the time (interest 0.45
//!   plus up to 0.3 of the creator's quality; 0.15 plus that for another
//!   genre).
//! * **Videos.** Author `a` has 4–43 videos `video-<a>-NNN`, each with a
//!   fixed length of 5–60 s: the catalogue depends on the seed only.
//! * **Live and short.** Actions are produced one generation step at a time,
//!   after every room's step, when the user's live visits overlapping the
//!   step are known: an action whose time falls inside a visit `[enter,
//!   leave]` is dropped with the rest of its video, and an item due then
//!   waits until 0.5–8 s after the LEAVE. So no short-video action (in
//!   particular no PLAY) happens while the user is in a room. A PLAY's watch
//!   time is drawn when it starts, so a user who enters a room while a video
//!   plays still reports the drawn watch time (the live model does not know
//!   about the feed; the watch may overlap the start of the visit).
//!
//! Behaviour draws come from one stream per user (purpose [`PURPOSE`], on the
//! day's seed); the catalogue and the creators from hashes of the seed. The
//! actions depend on the steps only, never on how `advance` is chunked.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::world::{hash01, mix64, user_genre, Rng, GENRES};
use crate::schema::{ShortVideoAction, ShortVideoActionKind};

/// Purpose of the per-user short-video behaviour streams in [`Rng::stream`]
/// (the rooms use 1–5 and 7).
pub(super) const PURPOSE: u64 = 8;
/// Share of users in a session at the start.
const ACTIVE_SHARE: f64 = 0.25;
/// Mean length of a scrolling session.
const MEAN_SESSION_MS: f64 = 180_000.0;
/// Shortest scrolling session.
const MIN_SESSION_MS: i64 = 20_000;
/// Mean idle time between sessions (a quarter of the time scrolling).
const MEAN_IDLE_MS: f64 = 540_000.0;
/// Shortest video.
const MIN_VIDEO_MS: i64 = 5_000;
/// Every video is shorter than this, so no watch time reaches it.
pub(super) const MAX_VIDEO_MS: i64 = 60_000;
/// Short-video-only creators: one per this many users.
const USERS_PER_CREATOR: usize = 8;
/// Fewest short-video-only creators.
const MIN_CREATORS: usize = 20;
/// Hash tags of the catalogue (the rooms use 1–3, 11–13, 21–22).
const TAG_CATALOGUE: u64 = 31;
const TAG_LENGTH: u64 = 32;
const TAG_QUALITY: u64 = 33;

/// A user's last two live visits `[enter, leave]`, older first: every visit
/// that can overlap the step being generated (a visit lasts at least a step,
/// so at most one ends and one starts within a step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Visits([(i64, i64); 2]);

impl Default for Visits {
    fn default() -> Self {
        Visits([(i64::MIN, i64::MIN); 2])
    }
}

impl Visits {
    /// The user entered a room at `enter`, to leave at `leave`.
    pub(super) fn enter(&mut self, enter: i64, leave: i64) {
        self.0 = [self.0[1], (enter, leave)];
    }

    /// The visit entered at `enter` now lasts until `leave`.
    pub(super) fn extend(&mut self, enter: i64, leave: i64) {
        if self.0[1].0 == enter {
            self.0[1].1 = self.0[1].1.max(leave);
        }
    }

    /// The LEAVE of the visit `t` falls in, if any.
    fn inside(&self, t: i64) -> Option<i64> {
        self.0
            .iter()
            .find(|&&(enter, leave)| enter <= t && t <= leave)
            .map(|&(_, leave)| leave)
    }
}

/// Who posted a video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Author {
    /// Room `r`'s streamer.
    Streamer(u32),
    /// Short-video-only creator `k`.
    Creator(u32),
}

impl Author {
    /// A key for the catalogue hashes.
    fn key(self) -> u64 {
        match self {
            Author::Streamer(r) => u64::from(r),
            Author::Creator(k) => (1 << 32) | u64::from(k),
        }
    }
}

/// One scrolling user.
struct Scroller {
    /// Index into the world's users (and the visits).
    user: u32,
    user_id: String,
    genre: u32,
    rng: Rng,
    /// The rooms the user is a viewer of, with the affinity to their streamer.
    rooms: Box<[(u32, f64)]>,
    max_affinity: f64,
    /// When the next feed item (or, idle, the next session) starts.
    next_item: i64,
    /// The current (or next) session ends here: no item starts after it.
    session_end: i64,
    /// The current video's actions not handed out yet, in time order.
    outbox: VecDeque<ShortVideoAction>,
    /// Authors followed (their keys).
    followed: Vec<u64>,
}

impl Scroller {
    /// Schedules the next item at `t`, or, when the session is over by then,
    /// the first item of the next session after an idle stretch.
    fn schedule(&mut self, t: i64) {
        if t < self.session_end {
            self.next_item = t;
            return;
        }
        let start = t + (self.rng.exp(MEAN_IDLE_MS) as i64).max(5_000);
        self.next_item = start;
        self.session_end = start + (self.rng.exp(MEAN_SESSION_MS) as i64).max(MIN_SESSION_MS);
    }

    /// When this user next needs a step's attention.
    fn next_due(&self) -> i64 {
        self.outbox
            .front()
            .map_or(self.next_item, |a| a.event_time_ms.min(self.next_item))
    }
}

/// The authors and their videos.
struct Catalogue {
    seed: u64,
    /// Each room's streamer id and genre.
    streamers: Vec<(String, u32)>,
    /// Short-video-only creators.
    creators: u32,
}

/// The short-video feed of every user, advanced step by step after the rooms.
pub(super) struct ShortVideos {
    cat: Catalogue,
    end_ms: i64,
    users: Vec<Scroller>,
    /// (next due time, index into `users`).
    due: BinaryHeap<Reverse<(i64, u32)>>,
}

impl ShortVideos {
    /// The feed of `users` (world user index, the rooms they view with the
    /// affinity), over `[start_ms, end_ms)`: the world from `seed`, the
    /// behaviour from `day_seed`.
    pub(super) fn new(
        seed: u64,
        day_seed: u64,
        start_ms: i64,
        end_ms: i64,
        streamers: Vec<(String, u32)>,
        users: Vec<(u32, Vec<(u32, f64)>)>,
    ) -> Self {
        let creators = (users.len() / USERS_PER_CREATOR)
            .max(MIN_CREATORS)
            .min(u32::MAX as usize) as u32;
        let mut due = BinaryHeap::with_capacity(users.len());
        let mut scrollers = Vec::with_capacity(users.len());
        for (i, (user, rooms)) in users.into_iter().enumerate() {
            let mut rng = Rng::stream(day_seed, u64::from(user), PURPOSE);
            let max_affinity = rooms.iter().map(|&(_, a)| a).fold(0.0, f64::max);
            // Mid-session at the start with the share of time spent scrolling.
            let (next_item, session_end) = if rng.chance(ACTIVE_SHARE) {
                let session = (rng.exp(MEAN_SESSION_MS) as i64).max(MIN_SESSION_MS);
                (start_ms + rng.range(0, 8_000), start_ms + session)
            } else {
                let first = start_ms + rng.exp(MEAN_IDLE_MS) as i64;
                let session = (rng.exp(MEAN_SESSION_MS) as i64).max(MIN_SESSION_MS);
                (first, first + session)
            };
            let sc = Scroller {
                user,
                user_id: format!("user-{user:06}"),
                genre: user_genre(seed, user),
                rng,
                rooms: rooms.into_boxed_slice(),
                max_affinity,
                next_item,
                session_end,
                outbox: VecDeque::new(),
                followed: Vec::new(),
            };
            if sc.next_item < end_ms {
                due.push(Reverse((sc.next_item, i as u32)));
            }
            scrollers.push(sc);
        }
        ShortVideos {
            cat: Catalogue {
                seed,
                streamers,
                creators,
            },
            end_ms,
            users: scrollers,
            due,
        }
    }

    /// Hands out, in generation order, the actions with event time before `e`
    /// (every earlier step was handed out already). `visits` must hold every
    /// room's visits up to `e`.
    pub(super) fn step(&mut self, e: i64, visits: &[Visits], out: &mut Vec<ShortVideoAction>) {
        while let Some(&Reverse((t, i))) = self.due.peek() {
            if t >= e {
                break;
            }
            self.due.pop();
            let Some(sc) = self.users.get_mut(i as usize) else {
                continue;
            };
            let next = self.cat.wake(sc, e, visits, out);
            if next < self.end_ms {
                self.due.push(Reverse((next, i)));
            }
        }
    }
}

impl Catalogue {
    /// Does what `sc` has to do before `e`; returns when it is next due.
    fn wake(
        &self,
        sc: &mut Scroller,
        e: i64,
        visits: &[Visits],
        out: &mut Vec<ShortVideoAction>,
    ) -> i64 {
        let live = visits.get(sc.user as usize).copied().unwrap_or_default();
        loop {
            while let Some(a) = sc.outbox.front() {
                if a.event_time_ms >= e {
                    break;
                }
                if live.inside(a.event_time_ms).is_some() {
                    // The user went live: the rest of this video is abandoned.
                    sc.outbox.clear();
                    break;
                }
                if let Some(a) = sc.outbox.pop_front() {
                    out.push(a);
                }
            }
            if !sc.outbox.is_empty() || sc.next_item >= e {
                break;
            }
            let t = sc.next_item;
            if let Some(leave) = live.inside(t) {
                let back = leave + 1 + sc.rng.range(500, 8_000);
                sc.schedule(back);
                continue;
            }
            self.item(sc, t);
        }
        sc.next_due()
    }

    /// The feed item shown to `sc` at `t`: its actions go to the outbox, the
    /// next item is scheduled.
    fn item(&self, sc: &mut Scroller, t: i64) {
        let (author, interest) = self.pick_author(sc);
        let author_id = match author {
            Author::Streamer(r) => self
                .streamers
                .get(r as usize)
                .map_or_else(String::new, |(id, _)| id.clone()),
            Author::Creator(k) => format!("author-{k:05}"),
        };
        let key = author.key();
        let videos = 4 + (hash01(self.seed, TAG_CATALOGUE, key as i64) * 40.0) as u64;
        let n = sc.rng.below(videos);
        let video_id = format!("video-{author_id}-{n:03}");
        let length = MIN_VIDEO_MS
            + (hash01(self.seed ^ mix64(key), TAG_LENGTH, n as i64)
                * (MAX_VIDEO_MS - MIN_VIDEO_MS) as f64) as i64;
        let action = |t: i64, kind: ShortVideoActionKind| ShortVideoAction {
            schema_version: 1,
            user_id: sc.user_id.clone(),
            video_id: video_id.clone(),
            author_id: author_id.clone(),
            event_time_ms: t,
            kind: kind as i32,
            watch_ms: 0,
            duration_ms: 0,
        };
        let mut acts = vec![action(t, ShortVideoActionKind::Impression)];
        let left_at = if sc.rng.chance((0.35 + 0.6 * interest).min(0.95)) {
            let tp = t + sc.rng.range(150, 900);
            let watch = if sc.rng.chance(0.15 + 0.4 * interest) {
                length
            } else {
                let w = 800.0 + sc.rng.exp(length as f64 * (0.2 + 0.4 * interest));
                (w as i64).min(length - 1)
            };
            let mut play = action(tp, ShortVideoActionKind::Play);
            play.watch_ms = watch as u32;
            play.duration_ms = length as u32;
            acts.push(play);
            let k = 0.3 + 1.75 * interest;
            let feedback = [
                (ShortVideoActionKind::Like, 0.10, 0.3),
                (ShortVideoActionKind::Comment, 0.03, 0.5),
                (ShortVideoActionKind::Share, 0.02, 0.8),
                (ShortVideoActionKind::Follow, 0.01, 0.8),
            ];
            for (kind, base, from) in feedback {
                if !sc.rng.chance(base * k) {
                    continue;
                }
                if kind == ShortVideoActionKind::Follow {
                    if sc.followed.contains(&key) {
                        continue;
                    }
                    sc.followed.push(key);
                }
                let lo = ((watch as f64 * from) as i64).max(1);
                acts.push(action(tp + sc.rng.range(lo, watch + 1), kind));
            }
            tp + watch
        } else {
            t + sc.rng.range(400, 2_500)
        };
        acts.sort_by_key(|a| a.event_time_ms);
        sc.outbox.extend(acts);
        let next = left_at + sc.rng.range(200, 1_500);
        sc.schedule(next);
    }

    /// The author of the next feed item for `sc`, and the user's interest in
    /// it, in `[0, 1]`.
    fn pick_author(&self, sc: &mut Scroller) -> (Author, f64) {
        let rooms = self.streamers.len() as u64;
        let u = sc.rng.f64();
        let p_own = 0.1 + 0.35 * sc.max_affinity;
        if u < p_own && !sc.rooms.is_empty() {
            let total: f64 = sc.rooms.iter().map(|&(_, a)| 0.05 + a).sum();
            let mut x = sc.rng.f64() * total;
            for &(r, a) in sc.rooms.iter() {
                x -= 0.05 + a;
                if x < 0.0 {
                    return (Author::Streamer(r), a);
                }
            }
            let (r, a) = sc.rooms[sc.rooms.len() - 1];
            return (Author::Streamer(r), a);
        }
        if u < p_own + 0.08 && rooms > 0 {
            let r = sc.rng.below(rooms) as u32;
            let same_genre = self
                .streamers
                .get(r as usize)
                .is_some_and(|&(_, g)| g == sc.genre);
            let a = sc
                .rooms
                .iter()
                .find(|&&(room, _)| room == r)
                .map_or(if same_genre { 0.3 } else { 0.1 }, |&(_, a)| a);
            return (Author::Streamer(r), a);
        }
        let n = self.creators;
        let k = if sc.rng.chance(0.6) {
            // Creator k has genre k % GENRES.
            let per_genre = u64::from(n.saturating_sub(sc.genre)).div_ceil(u64::from(GENRES));
            sc.genre + GENRES * sc.rng.below(per_genre) as u32
        } else {
            sc.rng.below(u64::from(n)) as u32
        };
        let quality = hash01(self.seed, TAG_QUALITY, i64::from(k));
        let base = if k % GENRES == sc.genre { 0.45 } else { 0.15 };
        (Author::Creator(k), (base + 0.3 * quality).min(1.0))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::super::world::tests::run_all as run;
    use super::super::world::{SimConfig, SimEvent};
    use super::*;
    use crate::schema::ActionKind;

    fn small(seed: u64, short_videos: bool) -> SimConfig {
        SimConfig {
            seed,
            rooms: 3,
            duration_ms: 120_000,
            video: None,
            audio: false,
            speech: false,
            short_videos,
            ..SimConfig::default()
        }
    }

    /// A busier world: more viewers, most of them shared, so many live visits.
    fn busy(seed: u64) -> SimConfig {
        SimConfig {
            rooms: 6,
            viewers: 120,
            shared_viewers: 0.6,
            duration_ms: 150_000,
            ..small(seed, true)
        }
    }

    fn shorts(events: &[SimEvent]) -> Vec<&ShortVideoAction> {
        events
            .iter()
            .filter_map(|e| match e {
                SimEvent::ShortVideo(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn kind(s: &ShortVideoAction) -> ShortVideoActionKind {
        ShortVideoActionKind::try_from(s.kind).expect("kind")
    }

    #[test]
    fn short_videos_change_no_room_event() {
        for cfg in [small(1, true), small(17, true), busy(5)] {
            let (on_sim, on) = run(cfg.clone(), 1000);
            let (off_sim, off) = run(
                SimConfig {
                    short_videos: false,
                    ..cfg
                },
                1000,
            );
            assert!(shorts(&off).is_empty());
            assert!(!shorts(&on).is_empty(), "no short-video actions");
            let rooms: Vec<&SimEvent> = on
                .iter()
                .filter(|e| !matches!(e, SimEvent::ShortVideo(_)))
                .collect();
            assert!(
                rooms == off.iter().collect::<Vec<_>>(),
                "room events differ"
            );
            assert!(on_sim.truth().ticks().eq(off_sim.truth().ticks()));
            assert_eq!(on_sim.truth().viewers(), off_sim.truth().viewers());
        }
    }

    #[test]
    fn short_video_actions_are_well_formed() {
        let cfg = small(1, true);
        let (start, end) = (cfg.start_ms, cfg.start_ms + cfg.duration_ms);
        let (sim, events) = run(cfg, 1000);
        let viewers: HashSet<&str> = sim
            .truth()
            .viewers()
            .iter()
            .map(|v| v.user_id.as_str())
            .collect();
        // The streamers of each user's rooms.
        let mut own: HashSet<(&str, &str)> = HashSet::new();
        for v in sim.truth().viewers() {
            own.insert((
                v.user_id.as_str(),
                sim.rooms()
                    .iter()
                    .find(|r| r.room_id == v.room_id)
                    .map_or("", |r| r.streamer_id.as_str()),
            ));
        }
        let streamers: HashSet<&str> = sim.rooms().iter().map(|r| r.streamer_id.as_str()).collect();
        let sv = shorts(&events);
        let mut counts: HashMap<ShortVideoActionKind, usize> = HashMap::new();
        let mut lengths: HashMap<&str, u32> = HashMap::new();
        let mut last_impression: HashMap<&str, (&str, i64)> = HashMap::new();
        let mut last_play: HashMap<&str, (&str, i64, i64)> = HashMap::new();
        let mut follows: HashSet<(&str, &str)> = HashSet::new();
        let mut gaps: Vec<i64> = Vec::new();
        let (mut by_streamer, mut by_own_streamer) = (0, 0);
        for s in &sv {
            assert_eq!(s.schema_version, 1);
            assert!(viewers.contains(s.user_id.as_str()), "{}", s.user_id);
            assert!(!s.video_id.is_empty() && !s.author_id.is_empty());
            assert!(s.video_id.starts_with(&format!("video-{}-", s.author_id)));
            assert!(s.event_time_ms >= start && s.event_time_ms < end);
            let k = kind(s);
            assert_ne!(k, ShortVideoActionKind::Unspecified);
            *counts.entry(k).or_default() += 1;
            let user = s.user_id.as_str();
            match k {
                ShortVideoActionKind::Impression => {
                    assert_eq!((s.watch_ms, s.duration_ms), (0, 0));
                    if let Some(&(_, t)) = last_impression.get(user) {
                        if s.event_time_ms - t < 60_000 {
                            gaps.push(s.event_time_ms - t);
                        }
                    }
                    last_impression.insert(user, (&s.video_id, s.event_time_ms));
                    if streamers.contains(s.author_id.as_str()) {
                        by_streamer += 1;
                        if own.contains(&(user, s.author_id.as_str())) {
                            by_own_streamer += 1;
                        }
                    }
                }
                ShortVideoActionKind::Play => {
                    assert!(s.duration_ms >= MIN_VIDEO_MS as u32);
                    assert!(i64::from(s.duration_ms) < MAX_VIDEO_MS);
                    assert!(s.watch_ms > 0 && s.watch_ms <= s.duration_ms);
                    assert_eq!(
                        *lengths.entry(&s.video_id).or_insert(s.duration_ms),
                        s.duration_ms,
                        "a video's length changed"
                    );
                    // Right after its impression.
                    let (video, t) = last_impression[user];
                    assert_eq!(video, s.video_id);
                    assert!(s.event_time_ms - t < 1_000);
                    last_play.insert(user, (&s.video_id, s.event_time_ms, i64::from(s.watch_ms)));
                }
                _ => {
                    assert_eq!((s.watch_ms, s.duration_ms), (0, 0));
                    // Feedback on the video being played, within its watch.
                    let (video, t, watch) = last_play[user];
                    assert_eq!(video, s.video_id);
                    assert!(s.event_time_ms > t && s.event_time_ms <= t + watch);
                    if k == ShortVideoActionKind::Follow {
                        assert!(follows.insert((user, &s.author_id)), "followed twice");
                    }
                }
            }
        }
        let n = |k| counts.get(&k).copied().unwrap_or(0) as f64;
        let plays = n(ShortVideoActionKind::Play);
        let play_share = plays / n(ShortVideoActionKind::Impression);
        let mean_gap = gaps.iter().sum::<i64>() as f64 / gaps.len() as f64;
        let users: HashSet<&str> = sv.iter().map(|s| s.user_id.as_str()).collect();
        println!(
            "{} short-video actions of {} of {} users: {counts:?}; played {play_share:.2}; likes {:.3}, comments {:.3}, shares {:.3}, follows {:.3} per play; {mean_gap:.0} ms between impressions; {by_streamer} impressions of streamers' videos, {by_own_streamer} of the user's own rooms'",
            sv.len(),
            users.len(),
            viewers.len(),
            n(ShortVideoActionKind::Like) / plays,
            n(ShortVideoActionKind::Comment) / plays,
            n(ShortVideoActionKind::Share) / plays,
            n(ShortVideoActionKind::Follow) / plays,
        );
        assert!(n(ShortVideoActionKind::Impression) > 100.0);
        assert!((0.45..0.75).contains(&play_share), "{play_share}");
        assert!(n(ShortVideoActionKind::Like) > 0.0);
        assert!((5_000.0..15_000.0).contains(&mean_gap), "{mean_gap}");
        // Only some users scroll.
        assert!(users.len() < viewers.len() * 3 / 4);
        assert!(by_own_streamer > by_streamer / 2 && by_own_streamer > 0);
    }

    #[test]
    fn no_short_video_action_while_live() {
        let (_, events) = run(busy(11), 1000);
        // Each user's live visits [enter, leave].
        let mut open: HashMap<&str, i64> = HashMap::new();
        let mut visits: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
        for ev in &events {
            if let SimEvent::Action(a) = ev {
                match ActionKind::try_from(a.kind) {
                    Ok(ActionKind::Enter) => {
                        open.insert(&a.user_id, a.event_time_ms);
                    }
                    Ok(ActionKind::Leave) => {
                        let enter = open.remove(a.user_id.as_str()).expect("enter");
                        visits
                            .entry(&a.user_id)
                            .or_default()
                            .push((enter, a.event_time_ms));
                    }
                    _ => {}
                }
            }
        }
        assert!(open.is_empty());
        let sv = shorts(&events);
        let mut both = HashSet::new();
        let mut between = 0;
        for s in &sv {
            let Some(v) = visits.get(s.user_id.as_str()) else {
                continue;
            };
            let t = s.event_time_ms;
            for &(enter, leave) in v {
                assert!(
                    t < enter || t > leave,
                    "{:?} of {} at {t} inside [{enter}, {leave}]",
                    kind(s),
                    s.user_id
                );
            }
            both.insert(s.user_id.as_str());
            if v.iter().any(|&(_, l)| l < t) && v.iter().any(|&(e, _)| e > t) {
                between += 1;
            }
        }
        println!(
            "{} short-video actions, {} users with live visits too, {between} actions between two visits",
            sv.len(),
            both.len()
        );
        assert!(both.len() >= 10, "few users in both domains");
        assert!(between > 0);
    }

    #[test]
    fn same_short_videos_however_chunked() {
        let cfg = busy(3);
        let (_, a) = run(cfg.clone(), 1000);
        assert!(shorts(&a).len() > 500);
        for step in [777, 3_700, 1_000_000] {
            let (_, b) = run(cfg.clone(), step);
            assert!(a == b, "1 s vs {step} ms steps differ");
        }
        let mut prev = i64::MIN;
        for ev in &a {
            assert!(ev.event_time_ms() >= prev, "out of order");
            prev = ev.event_time_ms();
        }
        let (_, c) = run(SimConfig { day: 1, ..cfg }, 1000);
        assert!(shorts(&a) != shorts(&c), "day 1 replayed day 0");
        // Keys: a short-video action by its user, a room event by its room.
        for ev in a.iter().take(5_000) {
            match ev {
                SimEvent::ShortVideo(s) => {
                    assert_eq!((ev.key(), ev.room_id()), (s.user_id.as_str(), ""));
                }
                other => assert_eq!(other.key(), other.room_id()),
            }
        }
    }
}
