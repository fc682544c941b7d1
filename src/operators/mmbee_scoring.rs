//! Which (viewer, room) pairs MMBee must score, kept incrementally: the state a
//! scoring stage holds about its users and the rooms they are in, and the rule
//! that decides what to re-score after each event.
//!
//! - A viewer who **enters** a room: that pair.
//! - A room whose **content** representation changes (a new content segment, or
//!   its tokens from MFQ): every pair of a viewer present in that room, and no other.
//! - A viewer who sends a **gift**: that viewer's pairs, and no other (the gift
//!   changes the viewer's history, which only the viewer's pairs read).
//! - Likes, comments and follows update the session a pair's next score reads but
//!   do not trigger one; leaving drops the pair.
//!
//! A user may be present in several rooms at once (several players open), each
//! with its own session, as the room stage's labels count them.
//! The stage that hosts this (a user-keyed stage sees only its users, every
//! room's content through a global table) turns the pairs [`ScoringState::take_due`]
//! returns into ranker inputs ([`crate::models::mmbee::PairFeatures`]).
//!
//! Not for: running models, building features, or labels (`gift_labels`).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::models::mmbee::{Gift, SessionRow};

/// Gifts kept per user (the ranker reads the last `seq_len`, 32 by default).
pub const HISTORY_KEPT: usize = 64;

/// Why a pair is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The viewer entered.
    Enter,
    /// The room's content changed.
    Content,
    /// The viewer gifted.
    Gift,
}

/// A pair to score.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Due {
    /// The viewer.
    pub user: Arc<str>,
    /// The room.
    pub room: Arc<str>,
    /// Why (the first reason since the pair was last scored).
    pub reason: Reason,
}

#[derive(Default)]
struct RoomState {
    streamer: Arc<str>,
    /// Start of the room's current content segment and its tokens.
    content: Option<(i64, Arc<[f32]>)>,
    viewers: HashSet<Arc<str>>,
}

#[derive(Clone, Copy, Default)]
struct Presence {
    enter_ms: i64,
    session: SessionRow,
}

#[derive(Default)]
struct UserState {
    rooms: HashMap<Arc<str>, Presence>,
    history: VecDeque<Gift>,
}

/// One session of a user, as the changelog keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRecord {
    /// The room.
    pub room: Arc<str>,
    /// Its streamer.
    pub streamer: Arc<str>,
    /// When the session began.
    pub enter_ms: i64,
    /// Its counters (`present_ms` unused).
    pub session: SessionRow,
}

/// What one pair's features are built from.
#[derive(Debug)]
pub struct PairView<'a> {
    /// The room's streamer.
    pub streamer: Arc<str>,
    /// The room's current content segment start and tokens.
    pub content: Option<&'a (i64, Arc<[f32]>)>,
    /// The viewer's session, `present_ms` as of the asked time.
    pub session: SessionRow,
    /// The viewer's gifts, oldest first.
    pub history: &'a VecDeque<Gift>,
    /// When the viewer's session in the room began.
    pub enter_ms: i64,
}

/// The scoring state of one stage partition.
#[derive(Default)]
pub struct ScoringState {
    rooms: HashMap<Arc<str>, RoomState>,
    users: HashMap<Arc<str>, UserState>,
    due: BTreeSet<(Arc<str>, Arc<str>)>,
    reasons: HashMap<(Arc<str>, Arc<str>), Reason>,
}

fn key(map_keys: &HashMap<Arc<str>, impl Sized>, s: &str) -> Arc<str> {
    map_keys
        .get_key_value(s)
        .map_or_else(|| Arc::from(s), |(k, _)| k.clone())
}

impl ScoringState {
    /// An empty state.
    pub fn new() -> Self {
        ScoringState::default()
    }

    fn mark(&mut self, user: &Arc<str>, room: &Arc<str>, reason: Reason) {
        let k = (user.clone(), room.clone());
        self.reasons.entry(k.clone()).or_insert(reason);
        self.due.insert(k);
    }

    fn unmark(&mut self, user: &Arc<str>, room: &Arc<str>) {
        let k = (user.clone(), room.clone());
        self.due.remove(&k);
        self.reasons.remove(&k);
    }

    /// `user` entered `room` (of `streamer`) at `t_ms` (a new session there).
    pub fn enter(&mut self, user: &str, room: &str, streamer: &str, t_ms: i64) {
        let u = key(&self.users, user);
        let r = key(&self.rooms, room);
        let rs = self.rooms.entry(r.clone()).or_default();
        if rs.streamer.is_empty() && !streamer.is_empty() {
            rs.streamer = Arc::from(streamer);
        }
        rs.viewers.insert(u.clone());
        let us = self.users.entry(u.clone()).or_default();
        us.rooms.insert(
            r.clone(),
            Presence {
                enter_ms: t_ms,
                session: SessionRow::default(),
            },
        );
        self.mark(&u, &r, Reason::Enter);
    }

    /// `user` left `room`.
    pub fn leave(&mut self, user: &str, room: &str) {
        let (u, r) = (key(&self.users, user), key(&self.rooms, room));
        if let Some(us) = self.users.get_mut(&u) {
            us.rooms.remove(room);
        }
        if let Some(rs) = self.rooms.get_mut(&r) {
            rs.viewers.remove(&u);
        }
        self.unmark(&u, &r);
    }

    /// A like, comment or follow of `user` in `room`: updates the session only.
    pub fn session_action(
        &mut self,
        user: &str,
        room: &str,
        like: bool,
        comment: bool,
        follow: bool,
    ) {
        if let Some(p) = self.users.get_mut(user).and_then(|u| u.rooms.get_mut(room)) {
            p.session.likes += f32::from(u8::from(like));
            p.session.comments += f32::from(u8::from(comment));
            p.session.followed |= follow;
        }
    }

    /// `user` sent a gift of `value` to `streamer` at `t_ms` (in `room`): the
    /// history of every pair of the user changed.
    pub fn gift(&mut self, user: &str, room: &str, streamer: &str, value: u64, t_ms: i64) {
        let u = key(&self.users, user);
        let us = self.users.entry(u.clone()).or_default();
        us.history.push_back(Gift {
            streamer_id: Arc::from(streamer),
            t_ms,
            value,
        });
        while us.history.len() > HISTORY_KEPT {
            us.history.pop_front();
        }
        if let Some(p) = us.rooms.get_mut(room) {
            p.session.gifts += 1.0;
            p.session.gift_value += value as f32;
        }
        let rooms: Vec<Arc<str>> = us.rooms.keys().cloned().collect();
        for r in rooms {
            self.mark(&u, &r, Reason::Gift);
        }
    }

    /// `room`'s content changed: its segment starting at `start_ms` with tokens.
    pub fn content(&mut self, room: &str, start_ms: i64, tokens: Arc<[f32]>) {
        let r = key(&self.rooms, room);
        let rs = self.rooms.entry(r.clone()).or_default();
        rs.content = Some((start_ms, tokens));
        let viewers: Vec<Arc<str>> = rs.viewers.iter().cloned().collect();
        for u in viewers {
            self.mark(&u, &r, Reason::Content);
        }
    }

    /// The pairs due for scoring (in a stable order), and forgets them.
    pub fn take_due(&mut self) -> Vec<Due> {
        let due = std::mem::take(&mut self.due);
        due.into_iter()
            .map(|(user, room)| {
                let reason = self
                    .reasons
                    .remove(&(user.clone(), room.clone()))
                    .unwrap_or(Reason::Enter);
                Due { user, room, reason }
            })
            .collect()
    }

    /// What a pair's features read at `t_ms`: the room's streamer and content,
    /// the viewer's session (with time present) and history.
    pub fn pair_view(&self, user: &str, room: &str, t_ms: i64) -> Option<PairView<'_>> {
        let us = self.users.get(user)?;
        let rs = self.rooms.get(room)?;
        let p = us.rooms.get(room)?;
        let mut session = p.session;
        session.present_ms = (t_ms - p.enter_ms).max(0) as f32;
        Some(PairView {
            streamer: rs.streamer.clone(),
            content: rs.content.as_ref(),
            session,
            history: &us.history,
            enter_ms: p.enter_ms,
        })
    }

    /// Viewers present in `room`.
    pub fn viewers(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, |r| r.viewers.len())
    }

    /// Start of the content segment the state holds for `room`.
    pub fn content_start(&self, room: &str) -> Option<i64> {
        self.rooms.get(room)?.content.as_ref().map(|(s, _)| *s)
    }

    /// Users with state (present somewhere or with a gifting history).
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// The rooms `user` is in, with the session in each, and the user's
    /// gifts (oldest first): what the changelog keeps of the user.
    pub fn user_record(&self, user: &str) -> (Vec<SessionRecord>, Vec<Gift>) {
        let Some(us) = self.users.get(user) else {
            return (Vec::new(), Vec::new());
        };
        let mut sessions: Vec<SessionRecord> = us
            .rooms
            .iter()
            .map(|(room, p)| SessionRecord {
                room: room.clone(),
                streamer: self
                    .rooms
                    .get(room)
                    .map_or_else(|| Arc::from(""), |r| r.streamer.clone()),
                enter_ms: p.enter_ms,
                session: p.session,
            })
            .collect();
        sessions.sort_by(|a, b| a.room.cmp(&b.room));
        (sessions, us.history.iter().cloned().collect())
    }

    /// Puts back a user as [`Self::user_record`] gave it, marking nothing due.
    pub fn restore_user(&mut self, user: &str, sessions: Vec<SessionRecord>, history: Vec<Gift>) {
        let u = key(&self.users, user);
        for s in &sessions {
            let rs = self.rooms.entry(s.room.clone()).or_default();
            if rs.streamer.is_empty() {
                rs.streamer = s.streamer.clone();
            }
            rs.viewers.insert(u.clone());
        }
        let us = self.users.entry(u).or_default();
        us.rooms = sessions
            .into_iter()
            .map(|s| {
                let p = Presence {
                    enter_ms: s.enter_ms,
                    session: s.session,
                };
                (s.room, p)
            })
            .collect();
        us.history = history.into_iter().collect();
        while us.history.len() > HISTORY_KEPT {
            us.history.pop_front();
        }
    }

    /// The content segment the state holds for `room` (start and tokens).
    pub fn room_content(&self, room: &str) -> Option<&(i64, Arc<[f32]>)> {
        self.rooms.get(room)?.content.as_ref()
    }

    /// Puts back `room`'s content segment, marking nothing due: its viewers
    /// were scored on it before the state was written. A newer one the state
    /// already holds stays.
    pub fn restore_content(&mut self, room: &str, start_ms: i64, tokens: Arc<[f32]>) {
        let r = key(&self.rooms, room);
        let rs = self.rooms.entry(r).or_default();
        if rs.content.as_ref().is_none_or(|(s, _)| *s < start_ms) {
            rs.content = Some((start_ms, tokens));
        }
    }

    /// Forgets users in no room without a gifting history, and rooms nobody
    /// of this partition is in (their content comes back from the room table
    /// on the next enter).
    pub fn forget_idle(&mut self) {
        self.users
            .retain(|_, u| !u.rooms.is_empty() || !u.history.is_empty());
        self.rooms.retain(|_, r| !r.viewers.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Ev {
        Enter(u8, u8),
        Leave(u8, u8),
        Like(u8, u8),
        Gift(u8, u8),
        Content(u8),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u8..6, 0u8..3).prop_map(|(u, r)| Ev::Enter(u, r)),
            (0u8..6, 0u8..3).prop_map(|(u, r)| Ev::Leave(u, r)),
            (0u8..6, 0u8..3).prop_map(|(u, r)| Ev::Like(u, r)),
            (0u8..6, 0u8..3).prop_map(|(u, r)| Ev::Gift(u, r)),
            (0u8..3).prop_map(Ev::Content),
        ]
    }

    proptest! {
        /// After any history, the next event makes due exactly the pairs the rule
        /// names: a content change only the room's present viewers, a gift only
        /// the gifter's pair, an enter only that pair, likes and leaves nothing.
        #[test]
        fn only_the_affected_pairs_are_rescored(before in prop::collection::vec(ev(), 0..40), last in ev()) {
            let mut s = ScoringState::new();
            // Where each user is, tracked independently of the state.
            let mut at: BTreeSet<(u8, u8)> = BTreeSet::new();
            let apply = |s: &mut ScoringState, at: &mut BTreeSet<(u8, u8)>, e: &Ev, t: i64| match *e {
                Ev::Enter(u, r) => { s.enter(&format!("u{u}"), &format!("r{r}"), "s", t); at.insert((u, r)); }
                Ev::Leave(u, r) => { s.leave(&format!("u{u}"), &format!("r{r}")); at.remove(&(u, r)); }
                Ev::Like(u, r) => s.session_action(&format!("u{u}"), &format!("r{r}"), true, false, false),
                Ev::Gift(u, r) => s.gift(&format!("u{u}"), &format!("r{r}"), "s", 1, t),
                Ev::Content(r) => s.content(&format!("r{r}"), t, vec![0.0f32; 4].into()),
            };
            for (i, e) in before.iter().enumerate() {
                apply(&mut s, &mut at, e, i as i64);
            }
            s.take_due();
            apply(&mut s, &mut at, &last, 1000);
            let got: BTreeSet<(String, String)> = s.take_due().into_iter().map(|d| (d.user.to_string(), d.room.to_string())).collect();
            let want: BTreeSet<(String, String)> = match last {
                Ev::Enter(u, r) => [(format!("u{u}"), format!("r{r}"))].into(),
                Ev::Content(r) => at.iter().filter(|(_, rr)| *rr == r).map(|(u, _)| (format!("u{u}"), format!("r{r}"))).collect(),
                Ev::Gift(u, _) => at.iter().filter(|(uu, _)| *uu == u).map(|(u, r)| (format!("u{u}"), format!("r{r}"))).collect(),
                Ev::Leave(..) | Ev::Like(..) => BTreeSet::new(),
            };
            prop_assert_eq!(got, want);
            // Every presence has its pair, and the rooms' lists agree.
            for (u, r) in &at {
                let (user, room) = (format!("u{u}"), format!("r{r}"));
                prop_assert!(s.pair_view(&user, &room, 1000).is_some(), "{} not in {}", user, room);
            }
            let present: usize = (0..3).map(|r| s.viewers(&format!("r{r}"))).sum();
            prop_assert_eq!(present, at.len());
        }
    }

    #[test]
    fn sessions_and_history_feed_the_pair() {
        let mut s = ScoringState::new();
        s.enter("a", "r1", "s1", 1_000);
        s.session_action("a", "r1", true, true, false);
        s.gift("a", "r1", "s1", 52, 5_000);
        s.leave("a", "r1");
        s.enter("a", "r2", "s2", 9_000);
        s.gift("a", "r2", "s2", 1, 10_000);
        assert!(s.pair_view("a", "r1", 10_000).is_none(), "a left r1");
        let PairView {
            streamer,
            content,
            session,
            history,
            enter_ms,
        } = s.pair_view("a", "r2", 12_000).unwrap();
        assert_eq!(enter_ms, 9_000);
        assert_eq!(&*streamer, "s2");
        assert!(content.is_none());
        assert_eq!(session.present_ms, 3_000.0);
        assert_eq!(
            (session.likes, session.gifts, session.gift_value),
            (0.0, 1.0, 1.0)
        );
        assert_eq!(history.len(), 2);
        let due = s.take_due();
        assert_eq!(due.len(), 1);
        assert_eq!((&*due[0].room, due[0].reason), ("r2", Reason::Enter));
        // In two rooms at once: a gift in one re-scores both pairs.
        s.enter("a", "r3", "s3", 13_000);
        s.take_due();
        s.gift("a", "r3", "s3", 5, 14_000);
        let rooms: Vec<String> = s.take_due().iter().map(|d| d.room.to_string()).collect();
        assert_eq!(rooms, ["r2", "r3"]);
        assert_eq!(s.pair_view("a", "r2", 14_000).unwrap().session.gifts, 1.0);
        assert_eq!(s.pair_view("a", "r3", 14_000).unwrap().session.gifts, 1.0);
    }
}
