//! Exactly-once Redis effects per event: [`RedisOnce`].
//!
//! The host replays batches (after a crash, a rebalance, a retry) and `fanout backfill` may
//! deliver events the live stream delivered before. Commands like `INCR` or `HINCRBY` are not
//! idempotent. `RedisOnce` takes, per event, the commands to apply, and applies each event's
//! commands at most once over all deliveries, in one atomic script (`EVAL`) per call, with
//! bookkeeping that does not grow with the number of events:
//!
//! ```
//! use fanout_sdk::exactly_once::RedisOnce;
//! use fanout_sdk::testing::{batch, event, MockHost};
//!
//! let host = MockHost::new();
//! let b = batch(vec![event(1, Some(7), 0), event(2, Some(7), 0)]);
//! for _delivery in 0..2 {
//!     // The same batch twice: the second time, every event is skipped.
//!     let mut once = RedisOnce::new("my:once:");
//!     for e in b.events.iter() {
//!         once.event(&e).cmd("HINCRBY").arg("my:count").arg("plays").arg(1);
//!     }
//!     let applied = once.apply(&host).unwrap();
//!     assert_eq!(applied.applied() + applied.skipped(), 2);
//! }
//! assert_eq!(host.redis_once_commands().len(), 2, "one HINCRBY per event, not four");
//! ```
//!
//! ## The rules
//!
//! All bookkeeping lives under the scope prefix given to [`RedisOnce::new`] (the plugin's grant
//! must cover it): the hash `{scope}marks` and the bitmaps `{scope}backfilled:{n}` and
//! `{scope}live:{n}`.
//!
//! - **Live events** (with a Kafka [`Position`]): the hash has one field per partition,
//!   `{topic}/{partition}`, holding the highest offset applied. An event is applied iff its
//!   offset is above that mark, it is not a backfilled event (below) and its event id is not
//!   in the live bitmap; the mark then moves to the highest offset applied. The hash also
//!   keeps `min_live_event_id`, the smallest event id the live stream delivered.
//! - **Re-sends**: an at-least-once producer (Debezium after a broker restart) may write an
//!   event a second time, at a new offset above the mark. Every live event applied sets its
//!   bit in `{scope}live:{id / 65536}` (bit `id % 65536`, the layout of the backfill bitmaps),
//!   and a live event whose bit is set is skipped as [`Outcome::Resent`]. Each write refreshes
//!   the bitmap's TTL (24 h unless [`RedisOnce::live_ttl_seconds`] says otherwise): re-sends
//!   are recognised within that window. Memory: 1 bit per event id over the window, at most
//!   8 KiB per key: about 21 MB a day at 2,000 events/s, 1 MB at 100/s.
//! - **Backfilled events** (no position, read from PostgreSQL): applied iff their id is below
//!   `min_live_event_id` (or the field is unset) and their bit in
//!   `{scope}backfilled:{id / 65536}` (bit `id % 65536`, at most 8 KiB per key) is clear;
//!   applying sets the bit, and every bitmap written gets a TTL (7 days unless
//!   [`RedisOnce::backfill_ttl_seconds`] says otherwise). Event ids from the first live one
//!   on are the live stream's (it delivers every insert committed after it started), ids
//!   below it predate the stream. The bitmap makes backfills idempotent with each other.
//! - A live event whose bit a backfill set is skipped too (a backfill ran before the lane got
//!   there): the live path reads the bit (`GETBIT`, which writes nothing).
//!
//! The assumption, and its edge: ids are taken at insert, not at commit, so an insert committed
//! **before** the stream started can hold a **higher** id than one committed after it. Such an
//! event is neither delivered by the stream nor below `min_live_event_id`: a backfill skips it
//! as covered by the stream (docs/plugin-authoring.md).
//!
//! The marks rely on Kafka's order: within a partition, a lane delivers offsets in order, and
//! every event below the mark was applied or given up (a rejected or dead-lettered event is not
//! applied later by a backfill of the live range). A topic deleted and created again under the
//! same name restarts its offsets at 0: delete `{scope}marks` then.
//!
//! Each call is one `EVAL`: atomic. If one of an author's commands fails inside it (a wrong
//! type), the events before it stay applied and marked, that event's earlier commands stay
//! applied (Redis has no rollback), and the call answers an error: retrying the batch skips
//! what was marked. Split very large batches over several calls, one after the other.
//!
//! Migration from per-event markers: [`RedisOnce::legacy_markers`] also treats an existing
//! `{prefix}{event_id}` key (`EXISTS`) as applied, for the time the old markers live.

use std::hash::BuildHasher;
use std::sync::Arc;

use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::redis::{Command, Commands, Reply};
use crate::{CapabilityError, Event, Host, Position};

/// Default TTL of the backfill bitmaps: 7 days.
pub const DEFAULT_BACKFILL_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// Default TTL of the live bitmaps (the window that catches a producer's re-sends): 24 h.
pub const DEFAULT_LIVE_TTL_SECONDS: u64 = 24 * 3600;

/// Event ids per bitmap key, backfill or live (8 KiB of bits).
pub const IDS_PER_BITMAP: i64 = 1 << 16;

/// The Redis commands the script runs itself (besides the authors' commands): a grant with
/// `allow_scripts = true` must allow them (the default command set does; a grant's
/// `commands` list must name them), since Redis checks the plugin's ACL user inside scripts.
pub const SCRIPT_COMMANDS: &[&str] = &["HGET", "HSET", "GETBIT", "SETBIT", "EXPIRE", "EXISTS"];

/// The field of the marks hash holding the smallest event id of the live stream.
pub const MIN_LIVE_FIELD: &str = "min_live_event_id";

/// What happened to one event of a [`RedisOnce`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Its commands ran now.
    Applied,
    /// Applied before: a live event at or below its partition's mark, or a backfilled event
    /// whose bit is set (or the same event twice in one call).
    Replayed,
    /// A live event a backfill applied first (its bit is set).
    AppliedByBackfill,
    /// A backfilled event the live stream covers (its id is not below `min_live_event_id`).
    CoveredByLive,
    /// A marker of the previous per-event scheme exists ([`RedisOnce::legacy_markers`]).
    LegacyMarker,
    /// A live event above its partition's mark whose event id was applied before at another
    /// offset: a producer re-send (at-least-once CDC after a broker restart). Skipped.
    Resent,
}

impl Outcome {
    /// The letter the script answers for this outcome.
    pub fn code(self) -> u8 {
        match self {
            Outcome::Applied => b'a',
            Outcome::Replayed => b'r',
            Outcome::AppliedByBackfill => b'b',
            Outcome::CoveredByLive => b'l',
            Outcome::LegacyMarker => b'm',
            Outcome::Resent => b'd',
        }
    }

    /// The outcome of a letter of the script's answer.
    pub fn from_code(c: u8) -> Option<Outcome> {
        Some(match c {
            b'a' => Outcome::Applied,
            b'r' => Outcome::Replayed,
            b'b' => Outcome::AppliedByBackfill,
            b'l' => Outcome::CoveredByLive,
            b'm' => Outcome::LegacyMarker,
            b'd' => Outcome::Resent,
            _ => return None,
        })
    }
}

/// The answer of [`RedisOnce::apply`]: one outcome per event, in the order they were added,
/// and the replies to the [`RedisOnce::then`] commands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    /// (event_id, outcome) per event.
    pub events: Vec<(i64, Outcome)>,
    /// One reply per [`RedisOnce::then`] command, in order.
    pub replies: Vec<Reply>,
}

impl Applied {
    /// Events whose commands ran in this call.
    pub fn applied(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, o)| *o == Outcome::Applied)
            .count()
    }

    /// Events skipped because they were applied before (by any path, re-sends included).
    pub fn skipped(&self) -> usize {
        self.events.len() - self.applied()
    }

    /// Whether the `index`-th event added was applied in this call.
    pub fn is_applied(&self, index: usize) -> bool {
        self.events
            .get(index)
            .is_some_and(|(_, o)| *o == Outcome::Applied)
    }
}

/// A Kafka position owned by a [`RedisOnce`] (the batch's [`Position`] borrows the batch).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnedPosition {
    /// Shared by the events of one topic (one allocation per call, not per event).
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
}

impl OwnedPosition {
    /// The field of the marks hash for this position's partition.
    pub fn field(&self) -> String {
        format!("{}/{}", self.topic, self.partition)
    }
}

/// One event and its commands.
#[derive(Debug, Clone, PartialEq)]
pub struct OnceEvent {
    pub event_id: i64,
    /// None for a backfilled event.
    pub position: Option<OwnedPosition>,
    pub commands: Commands,
}

/// Per-event commands applied exactly once: see the [module](self) documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisOnce {
    scope: String,
    backfill_ttl_seconds: u64,
    live_ttl_seconds: u64,
    legacy_marker_prefix: Option<String>,
    events: Vec<OnceEvent>,
    then: Commands,
}

impl RedisOnce {
    /// Bookkeeping under `scope` (a key prefix the plugin's grant covers, one per plugin:
    /// two plugins sharing a scope would skip each other's events), e.g. `"devcount:once:"`.
    pub fn new(scope: impl Into<String>) -> Self {
        RedisOnce {
            scope: scope.into(),
            backfill_ttl_seconds: DEFAULT_BACKFILL_TTL_SECONDS,
            live_ttl_seconds: DEFAULT_LIVE_TTL_SECONDS,
            legacy_marker_prefix: None,
            events: Vec::new(),
            then: Commands::new(),
        }
    }

    /// How long the backfill bitmaps are kept after their last write (default 7 days): a
    /// second backfill over the same pre-stream range later than that applies it again.
    pub fn backfill_ttl_seconds(mut self, seconds: u64) -> Self {
        self.backfill_ttl_seconds = seconds.max(1);
        self
    }

    /// How long the live bitmaps (`{scope}live:{n}`) are kept after their last write (default
    /// 24 h): the window within which a producer's re-send of an event at a new offset is
    /// recognised by its event id ([`Outcome::Resent`]). Costs 1 bit per event id over the
    /// window (about 21 MB a day at 2,000 events/s).
    pub fn live_ttl_seconds(mut self, seconds: u64) -> Self {
        self.live_ttl_seconds = seconds.max(1);
        self
    }

    /// Also treats an event as applied when the key `{prefix}{event_id}` exists: the markers
    /// of a previous per-event scheme (`SET marker NX`), honoured until they expire. Adds one
    /// key per event to the script: drop it once the old markers are gone.
    pub fn legacy_markers(mut self, prefix: impl Into<String>) -> Self {
        self.legacy_marker_prefix = Some(prefix.into());
        self
    }

    /// Adds an event of the batch; returns its commands, to fill with `cmd`/`arg`:
    /// `once.event(&e).cmd("HINCRBY").arg(key).arg(field).arg(1);` (any number of commands,
    /// none too).
    pub fn event(&mut self, e: &Event<'_>) -> &mut Commands {
        self.event_at(e.event_id(), e.position(), Commands::new())
    }

    /// [`RedisOnce::event`] from an id and a position (None: backfilled), with commands to
    /// start from (`Commands::new()`, or a `Vec<Command>` built elsewhere).
    pub fn event_at(
        &mut self,
        event_id: i64,
        position: Option<Position<'_>>,
        commands: impl Into<Commands>,
    ) -> &mut Commands {
        let position = position.map(|p| {
            // Events of a call mostly share one topic: the previous event's copy serves.
            let topic = match self.events.last().and_then(|e| e.position.as_ref()) {
                Some(q) if *q.topic == *p.topic => Arc::clone(&q.topic),
                _ => Arc::from(p.topic),
            };
            OwnedPosition {
                topic,
                partition: p.partition,
                offset: p.offset,
            }
        });
        self.events.push(OnceEvent {
            event_id,
            position,
            commands: commands.into(),
        });
        let last = self.events.len() - 1;
        &mut self.events[last].commands
    }

    /// Ordinary commands sent after the script in the same round trip (idempotent ones that
    /// need no bookkeeping); their replies are [`Applied::replies`].
    pub fn then(&mut self) -> &mut Commands {
        &mut self.then
    }

    /// The commands of [`RedisOnce::then`].
    pub fn then_commands(&self) -> &Commands {
        &self.then
    }

    /// The events added so far.
    pub fn events(&self) -> &[OnceEvent] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The scope prefix given to [`RedisOnce::new`].
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The TTL of the backfill bitmaps, seconds.
    pub fn backfill_ttl(&self) -> u64 {
        self.backfill_ttl_seconds
    }

    /// `{scope}marks`: the per-partition marks and `min_live_event_id`.
    pub fn marks_key(&self) -> String {
        format!("{}marks", self.scope)
    }

    /// `{scope}backfilled:{event_id / 65536}`: the bitmap holding the event's bit.
    pub fn bitmap_key(&self, event_id: i64) -> String {
        format!(
            "{}backfilled:{}",
            self.scope,
            event_id.div_euclid(IDS_PER_BITMAP)
        )
    }

    /// `{scope}live:{event_id / 65536}`: the bitmap of event ids the live stream applied.
    pub fn live_bitmap_key(&self, event_id: i64) -> String {
        format!("{}live:{}", self.scope, event_id.div_euclid(IDS_PER_BITMAP))
    }

    /// The TTL of the live bitmaps, seconds.
    pub fn live_ttl(&self) -> u64 {
        self.live_ttl_seconds
    }

    /// The old marker of an event, when [`RedisOnce::legacy_markers`] is set.
    pub fn legacy_marker_key(&self, event_id: i64) -> Option<String> {
        self.legacy_marker_prefix
            .as_ref()
            .map(|p| format!("{p}{event_id}"))
    }

    /// Applies the events' commands exactly once, then the [`RedisOnce::then`] commands: one
    /// round trip, one atomic script.
    pub fn apply(self, host: &(impl Host + ?Sized)) -> Result<Applied, CapabilityError> {
        host.redis_once(self)
    }

    /// The `EVAL` of [`SCRIPT`] that applies these events (what [`Host::redis_once`] sends by
    /// default). Err when a command cannot run inside a script (a script command).
    pub fn eval_command(&self) -> Result<Command, CapabilityError> {
        let resp = self.clone().take_eval()?;
        crate::resp::parse_owned(&resp)
            .map_err(|e| CapabilityError::Failed(format!("redis: {e}")))?
            .pop()
            .ok_or_else(|| CapabilityError::Failed("redis: no EVAL written".into()))
    }

    /// The `EVAL` of [`SCRIPT`] for the events, written in RESP (one command, as
    /// `redis.pipeline-resp` takes it), moving their arguments into it (the events are gone
    /// afterwards). The arguments go straight into one buffer: some 20 per event, each a
    /// buffer of its own before.
    fn take_eval(&mut self) -> Result<Vec<u8>, CapabilityError> {
        let events = std::mem::take(&mut self.events);
        let mut keys = Keys::with_capacity(4 + events.len() * 2);
        keys.index(self.marks_key().into_bytes());
        let mut argv = crate::resp::Args::with_capacity(64 + events.len() * 192);
        argv.number(self.backfill_ttl_seconds);
        argv.number(self.live_ttl_seconds);
        argv.number(events.len());
        // Consecutive events mostly share a partition and a bitmap (65,536 ids each): their
        // marks field and bitmap key indexes are made once and reused.
        let mut fields: Vec<(Arc<str>, i32, Vec<u8>)> = Vec::new();
        let mut bitmap: Option<(i64, usize)> = None;
        let mut live_bitmap: Option<(i64, usize)> = None;
        for e in events {
            let id = e.event_id;
            let n = id.div_euclid(IDS_PER_BITMAP);
            argv.number(id);
            match &e.position {
                Some(p) => {
                    let known = fields.iter().position(|(topic, partition, _)| {
                        *partition == p.partition && *topic == p.topic
                    });
                    let i = known.unwrap_or_else(|| {
                        fields.push((Arc::clone(&p.topic), p.partition, p.field().into_bytes()));
                        fields.len() - 1
                    });
                    argv.bytes(&fields[i].2);
                    argv.number(p.offset);
                }
                None => {
                    argv.bytes(b"");
                    argv.bytes(b"");
                }
            }
            let at = match bitmap {
                Some((m, at)) if m == n => at,
                _ => keys.index(self.bitmap_key(id).into_bytes()),
            };
            bitmap = Some((n, at));
            argv.number(at);
            argv.number(id.rem_euclid(IDS_PER_BITMAP));
            // Backfilled events never read or write the live bitmap: no key for them.
            let live = match (&e.position, live_bitmap) {
                (None, _) => 0,
                (Some(_), Some((m, at))) if m == n => at,
                (Some(_), _) => {
                    let at = keys.index(self.live_bitmap_key(id).into_bytes());
                    live_bitmap = Some((n, at));
                    at
                }
            };
            argv.number(live);
            let legacy = match &self.legacy_marker_prefix {
                Some(prefix) => {
                    let mut key = Vec::with_capacity(prefix.len() + 20);
                    key.extend_from_slice(prefix.as_bytes());
                    key.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
                    keys.index(key)
                }
                None => 0,
            };
            argv.number(legacy);
            argv.number(e.commands.len());
            for c in e.commands.into_vec() {
                argv.number(c.len());
                let mask = mask_letters(&c)?;
                argv.bytes(&mask);
                for (arg, kind) in c.into_iter().zip(&mask) {
                    if *kind == b'k' {
                        argv.number(keys.index(arg));
                    } else {
                        argv.bytes(&arg);
                    }
                }
            }
        }
        let key_bytes: usize = keys.list.iter().map(|k| k.len() + 16).sum();
        let mut out = Vec::with_capacity(64 + SCRIPT.len() + key_bytes + argv.as_bytes().len());
        crate::resp::write_length(&mut out, b'*', 3 + keys.list.len() + argv.len());
        crate::resp::write_bulk(&mut out, b"EVAL");
        crate::resp::write_bulk(&mut out, SCRIPT.as_bytes());
        crate::resp::write_bulk(
            &mut out,
            itoa::Buffer::new().format(keys.list.len()).as_bytes(),
        );
        for k in &keys.list {
            crate::resp::write_bulk(&mut out, k);
        }
        out.extend_from_slice(argv.as_bytes());
        Ok(out)
    }

    /// Reads the script's reply: one outcome code per event.
    pub fn parse_reply(&self, reply: &Reply) -> Result<Applied, CapabilityError> {
        let ids: Vec<i64> = self.events.iter().map(|e| e.event_id).collect();
        Ok(Applied {
            events: parse_codes(&ids, reply)?,
            replies: Vec::new(),
        })
    }
}

/// The script's reply for events `ids`: one outcome letter per event.
fn parse_codes(ids: &[i64], reply: &Reply) -> Result<Vec<(i64, Outcome)>, CapabilityError> {
    let codes: &[u8] = match reply {
        Reply::Data(d) => d,
        Reply::Status(s) => s.as_bytes(),
        Reply::Nil if ids.is_empty() => &[],
        other => {
            return Err(CapabilityError::Failed(format!(
                "exactly-once script answered {other:?}"
            )))
        }
    };
    if codes.len() != ids.len() {
        return Err(CapabilityError::Failed(format!(
            "exactly-once script answered {} outcomes for {} events",
            codes.len(),
            ids.len()
        )));
    }
    codes
        .iter()
        .zip(ids)
        .map(|(c, id)| {
            Outcome::from_code(*c)
                .map(|o| (*id, o))
                .ok_or_else(|| CapabilityError::Failed(format!("exactly-once script: outcome {c}")))
        })
        .collect()
}

/// The default [`Host::redis_once`]: the `EVAL` and the `then` commands in one pipeline.
pub fn apply_by_script(
    host: &(impl Host + ?Sized),
    mut once: RedisOnce,
) -> Result<Applied, CapabilityError> {
    // What the reply is read against: the ids, in order (the commands move into the EVAL).
    let ids: Vec<i64> = once.events.iter().map(|e| e.event_id).collect();
    let then = std::mem::take(&mut once.then).into_vec();
    // One buffer in the Redis protocol: the EVAL, then the `then` commands.
    let mut resp = if ids.is_empty() {
        Vec::new()
    } else {
        once.take_eval()?
    };
    for c in &then {
        crate::resp::write_command(&mut resp, c);
    }
    let count = usize::from(!ids.is_empty()) + then.len();
    let mut replies = if count == 0 {
        Vec::new()
    } else {
        crate::redis::one_reply_each(host.redis_pipeline_resp(&resp, false)?, count)?
    };
    if ids.is_empty() {
        return Ok(Applied {
            events: Vec::new(),
            replies,
        });
    }
    let rest = replies.split_off(1);
    Ok(Applied {
        events: parse_codes(&ids, &replies[0])?,
        replies: rest,
    })
}

/// The deduplicated KEYS of a script, 1-based as Lua sees them, in first-seen order.
struct Keys {
    list: Vec<Vec<u8>>,
    /// Hash of a key -> its index (the first key with that hash; others are searched). FxHash:
    /// the keys come from the plugin and the host, and a collision only costs a scan.
    at: FxHashMap<u64, usize>,
}

impl Keys {
    fn with_capacity(n: usize) -> Self {
        Keys {
            list: Vec::with_capacity(n),
            at: FxHashMap::with_capacity_and_hasher(n, FxBuildHasher),
        }
    }

    /// The index of `key`, added if new.
    fn index(&mut self, key: Vec<u8>) -> usize {
        let h = FxBuildHasher.hash_one(&key);
        match self.at.get(&h) {
            Some(&i) if self.list[i - 1] == key => return i,
            // Two keys with one hash: rare enough for a scan.
            Some(_) => {
                if let Some(p) = self.list.iter().position(|k| *k == key) {
                    return p + 1;
                }
            }
            None => {}
        }
        self.list.push(key);
        let i = self.list.len();
        self.at.entry(h).or_insert(i);
        i
    }
}

/// Which arguments of `command` are keys (index 0, the name, never), as the host reads them
/// for its grant check (host/src/plugin/grants.rs): most commands take one key first; `DEL`,
/// `UNLINK`, `EXISTS`, `MGET`, `TOUCH`, `PFCOUNT` only keys; `MSET`, `MSETNX` key-value
/// pairs; `ZUNIONSTORE`, `ZINTERSTORE` a destination and `numkeys` keys.
pub fn key_mask(command: &Command) -> Result<Vec<bool>, CapabilityError> {
    Ok(mask_letters(command)?.iter().map(|m| *m == b'k').collect())
}

/// [`key_mask`] as the script takes it: `k` for a key, `v` for any other argument.
fn mask_letters(command: &Command) -> Result<Vec<u8>, CapabilityError> {
    let name: &[u8] = command
        .first()
        .ok_or_else(|| CapabilityError::NotGranted("an empty command".into()))?;
    let is = |names: &[&str]| {
        names
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
    };
    let n = command.len();
    let mut mask = vec![b'v'; n];
    if is(&["EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "MULTI", "EXEC"]) {
        return Err(CapabilityError::NotGranted(format!(
            "{} cannot run inside the exactly-once script",
            String::from_utf8_lossy(name).to_ascii_uppercase()
        )));
    } else if is(&["PING", "TIME", "ECHO"]) {
    } else if is(&["DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "PFCOUNT"]) {
        mask.iter_mut().skip(1).for_each(|k| *k = b'k');
    } else if is(&["MSET", "MSETNX"]) {
        mask.iter_mut().skip(1).step_by(2).for_each(|k| *k = b'k');
    } else if is(&["ZUNIONSTORE", "ZINTERSTORE"]) {
        let keys: usize = command
            .get(2)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                CapabilityError::NotGranted(format!(
                    "{}: argument 2 must be numkeys",
                    String::from_utf8_lossy(name).to_ascii_uppercase()
                ))
            })?;
        if n > 1 {
            mask[1] = b'k';
        }
        mask.iter_mut().skip(3).take(keys).for_each(|k| *k = b'k');
    } else if n > 1 {
        mask[1] = b'k';
    }
    Ok(mask)
}

/// The script of [`RedisOnce::eval_command`].
///
/// `KEYS[1]` = `{scope}marks`; the other keys (deduplicated) are bitmaps, old markers and the
/// commands' keys. `ARGV[1]` = backfill bitmap TTL (s), `ARGV[2]` = live bitmap TTL (s),
/// `ARGV[3]` = number of events, then per event: event_id, marks field (`""`: backfilled),
/// offset, backfill bitmap key index, bit (in both bitmaps), live bitmap key index (0 for a
/// backfilled event), old marker key index (0: none), number of commands; per command: number
/// of arguments, a mask (`k` key, `v` value per argument), the arguments (keys as KEYS
/// indexes). Returns one outcome letter per event (`a` applied, `r` replayed, `b` applied by a
/// backfill, `d` re-sent by the producer at another offset, `l` covered by the live stream,
/// `m` old marker), or an error after marking the events before a failed command. Live
/// events settled `a`, `m` or `b` set their bit in the live bitmap, whose TTL each write
/// refreshes.
pub const SCRIPT: &str = r#"
local marks = KEYS[1]
local ttl = tonumber(ARGV[1])
local live_ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local min_live = tonumber(redis.call('HGET', marks, 'min_live_event_id'))
local min_text = nil
local start, top, top_text, done, touched, live_touched = {}, {}, {}, {}, {}, {}
local out = {}
local function flush()
  for field, off in pairs(top_text) do redis.call('HSET', marks, field, off) end
  if min_text then redis.call('HSET', marks, 'min_live_event_id', min_text) end
  for key in pairs(touched) do redis.call('EXPIRE', key, ttl) end
  for key in pairs(live_touched) do redis.call('EXPIRE', key, live_ttl) end
end
local a = 4
for i = 1, n do
  local id_text = ARGV[a]
  local id = tonumber(id_text)
  local field, offset = ARGV[a + 1], ARGV[a + 2]
  local bitmap, bit = KEYS[tonumber(ARGV[a + 3])], tonumber(ARGV[a + 4])
  local live = KEYS[tonumber(ARGV[a + 5])]
  local legacy = tonumber(ARGV[a + 6])
  local ncmds = tonumber(ARGV[a + 7])
  a = a + 8
  local status
  local off
  if field ~= '' then
    off = tonumber(offset)
    local m = start[field]
    if m == nil then
      m = tonumber(redis.call('HGET', marks, field)) or -1
      start[field] = m
    end
    local seen = field .. '@' .. offset
    if off <= m or done[seen] then
      status = 'r'
    else
      done[seen] = true
      if redis.call('GETBIT', bitmap, bit) == 1 then
        status = 'b'
      elseif redis.call('GETBIT', live, bit) == 1 then
        status = 'd'
      elseif legacy > 0 and redis.call('EXISTS', KEYS[legacy]) == 1 then
        status = 'm'
      else
        status = 'a'
      end
    end
  elseif min_live ~= nil and id >= min_live then
    status = 'l'
  elseif redis.call('GETBIT', bitmap, bit) == 1 then
    status = 'r'
  elseif legacy > 0 and redis.call('EXISTS', KEYS[legacy]) == 1 then
    status = 'm'
  else
    status = 'a'
  end
  for c = 1, ncmds do
    local nargs, mask = tonumber(ARGV[a]), ARGV[a + 1]
    if status == 'a' then
      local args = {}
      for j = 1, nargs do
        local v = ARGV[a + 1 + j]
        if string.byte(mask, j) == 107 then v = KEYS[tonumber(v)] end
        args[j] = v
      end
      local r = redis.pcall(unpack(args))
      if type(r) == 'table' and r.err then
        flush()
        return redis.error_reply('exactly-once: event ' .. id_text ..
          ' command ' .. c .. ' (' .. tostring(args[1]) .. '): ' .. r.err ..
          '; the events before it are settled')
      end
    end
    a = a + 2 + nargs
  end
  if field ~= '' then
    if status ~= 'r' then
      if status ~= 'd' then
        redis.call('SETBIT', live, bit, 1)
        live_touched[live] = true
      end
      if (top[field] or start[field]) < off then
        top[field] = off
        top_text[field] = offset
      end
      if min_live == nil or id < min_live then
        min_live = id
        min_text = id_text
      end
    end
  elseif status == 'a' or status == 'm' then
    redis.call('SETBIT', bitmap, bit, 1)
    touched[bitmap] = true
  end
  out[i] = status
end
flush()
return table.concat(out)
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{batch, batch_at, event, Call, MockHost};
    use crate::Batch;
    use std::collections::HashMap;

    const SCOPE: &str = "dc:once:";

    /// A command from text arguments.
    fn command(args: &[&str]) -> Command {
        let mut c = Commands::new();
        c.args(args.iter().copied());
        c.into_vec().remove(0)
    }

    /// Applies `b` the way a plugin does; returns the outcomes in event order.
    fn deliver(host: &MockHost, b: &Batch) -> Vec<Outcome> {
        let mut once = RedisOnce::new(SCOPE);
        for e in b.events.iter() {
            once.event(&e).cmd("INCRBY").arg("dc:n").arg(e.event_id());
        }
        let applied = once.apply(host).expect("apply");
        applied.events.iter().map(|(_, o)| *o).collect()
    }

    /// The event ids whose commands ran, over all calls.
    fn effects(host: &MockHost) -> Vec<i64> {
        host.redis_once_commands()
            .iter()
            .map(|c| c[2].parse().unwrap())
            .collect()
    }

    fn at(topic: &str, partition: i32, offset: i64) -> Option<Position<'_>> {
        Some(Position {
            topic,
            partition,
            offset,
        })
    }

    #[test]
    fn a_replayed_batch_applies_nothing_twice() {
        let host = MockHost::new();
        let b = batch((1..=3).map(|id| event(id, Some(7), 0)).collect());
        assert_eq!(deliver(&host, &b), vec![Outcome::Applied; 3]);
        assert_eq!(deliver(&host, &b), vec![Outcome::Replayed; 3]);
        assert_eq!(effects(&host), vec![1, 2, 3]);
        assert_eq!(host.once_mark(SCOPE, "test", 0), Some(3));
        assert_eq!(host.once_min_live(SCOPE), Some(1));
    }

    #[test]
    fn a_batch_straddling_the_mark_applies_only_what_is_above_it() {
        let host = MockHost::new();
        deliver(
            &host,
            &batch((1..=5).map(|id| event(id, None, 0)).collect()),
        );
        // After a crash, the host replays from an older commit: 4..=8.
        let out = deliver(
            &host,
            &batch((4..=8).map(|id| event(id, None, 0)).collect()),
        );
        use Outcome::*;
        assert_eq!(out, vec![Replayed, Replayed, Applied, Applied, Applied]);
        assert_eq!(effects(&host), (1..=8).collect::<Vec<_>>());
        assert_eq!(host.once_mark(SCOPE, "test", 0), Some(8));
    }

    #[test]
    fn marks_are_per_partition_and_duplicates_in_one_call_count_once() {
        let host = MockHost::new();
        let evs: Vec<_> = (1..=4).map(|id| event(id, None, 0)).collect();
        let b = batch_at([
            (&evs[0], at("t", 0, 10)),
            (&evs[1], at("t", 1, 3)),
            (&evs[2], at("t", 1, 3)), // the same position twice (a host bug): once
            (&evs[3], at("u", 0, 1)),
        ]);
        use Outcome::*;
        assert_eq!(
            deliver(&host, &b),
            vec![Applied, Applied, Replayed, Applied]
        );
        assert_eq!(host.once_mark(SCOPE, "t", 0), Some(10));
        assert_eq!(host.once_mark(SCOPE, "t", 1), Some(3));
        assert_eq!(host.once_mark(SCOPE, "u", 0), Some(1));
        // Offset 2 of partition t/0 is below its mark; offset 4 of t/1 is above its own.
        let next = event(5, None, 0);
        let b = batch_at([(&evs[0], at("t", 0, 2)), (&next, at("t", 1, 4))]);
        assert_eq!(deliver(&host, &b), vec![Replayed, Applied]);
    }

    #[test]
    fn backfill_over_the_live_range_applies_only_what_predates_the_stream() {
        let host = MockHost::new();
        let evs: Vec<_> = (1..=10).map(|id| event(id, None, 0)).collect();
        // The live stream started at event 6.
        deliver(&host, &batch(evs[5..].to_vec()));
        assert_eq!(host.once_min_live(SCOPE), Some(6));
        let backfill = batch_at(evs.iter().map(|e| (e, None)));
        use Outcome::*;
        let mut want = vec![Applied; 5];
        want.extend([CoveredByLive; 5]);
        assert_eq!(deliver(&host, &backfill), want);
        // The same backfill again: the bits say it was done.
        let mut want = vec![Replayed; 5];
        want.extend([CoveredByLive; 5]);
        assert_eq!(deliver(&host, &backfill), want);
        let mut got = effects(&host);
        got.sort();
        assert_eq!(got, (1..=10).collect::<Vec<_>>(), "each event once");
    }

    #[test]
    fn a_backfill_before_the_lane_caught_up_is_not_applied_again_live() {
        let host = MockHost::new();
        let evs: Vec<_> = (1..=6).map(|id| event(id, None, 0)).collect();
        // No live event yet: the backfill applies 1..=4 and sets their bits.
        let out = deliver(&host, &batch_at(evs[..4].iter().map(|e| (e, None))));
        assert_eq!(out, vec![Outcome::Applied; 4]);
        // The lane delivers 3..=6 (offset = id): 3 and 4 were applied by the backfill.
        use Outcome::*;
        let out = deliver(&host, &batch(evs[2..].to_vec()));
        assert_eq!(
            out,
            vec![AppliedByBackfill, AppliedByBackfill, Applied, Applied]
        );
        assert_eq!(host.once_mark(SCOPE, "test", 0), Some(6));
        assert_eq!(host.once_min_live(SCOPE), Some(3));
        assert_eq!(effects(&host), (1..=6).collect::<Vec<_>>());
        // A late live event with a lower id than the first live one (its transaction committed
        // later) lowers min_live_event_id; a backfill then skips it.
        let late = event(2, None, 0);
        let out = deliver(&host, &batch_at([(&late, at("test", 0, 7))]));
        assert_eq!(out, vec![AppliedByBackfill]);
        assert_eq!(host.once_min_live(SCOPE), Some(2));
    }

    /// Debezium (at-least-once) re-sends event 7239 after a broker restart at a new offset: the
    /// offset is above the mark, the event id says it was applied.
    #[test]
    fn a_producer_resend_at_a_new_offset_is_not_applied_again() {
        let host = MockHost::new();
        let e = event(7239, None, 0);
        let out = deliver(&host, &batch_at([(&e, at("t", 3, 10))]));
        assert_eq!(out, vec![Outcome::Applied]);
        let resent = deliver(&host, &batch_at([(&e, at("t", 3, 11))]));
        assert_eq!(resent, vec![Outcome::Resent]);
        assert_eq!(
            effects(&host),
            vec![7239],
            "the re-send's commands did not run"
        );
        assert_eq!(
            host.once_mark(SCOPE, "t", 3),
            Some(11),
            "the mark moves past it"
        );
        // Both copies in one call, and a re-send on another partition: applied once.
        let f = event(7240, None, 0);
        let mut once = RedisOnce::new(SCOPE);
        for (p, o) in [(3, 12), (3, 13), (1, 5)] {
            once.event_at(f.event_id, at("t", p, o), vec![])
                .cmd("INCRBY")
                .arg("dc:n")
                .arg(f.event_id);
        }
        let applied = once.apply(&host).unwrap();
        use Outcome::*;
        assert_eq!(
            applied.events,
            vec![(7240, Applied), (7240, Resent), (7240, Resent)]
        );
        assert_eq!((applied.applied(), applied.skipped()), (1, 2));
        assert_eq!(effects(&host), vec![7239, 7240]);
    }

    #[test]
    fn old_markers_count_as_applied() {
        let host = MockHost::new();
        host.insert_key("old:seen:2");
        let b = batch((1..=3).map(|id| event(id, None, 0)).collect());
        let mut once = RedisOnce::new(SCOPE).legacy_markers("old:seen:");
        for e in b.events.iter() {
            once.event(&e).cmd("INCRBY").arg("dc:n").arg(e.event_id());
        }
        let applied = once.apply(&host).unwrap();
        use Outcome::*;
        assert_eq!(
            applied.events,
            vec![(1, Applied), (2, LegacyMarker), (3, Applied)]
        );
        assert_eq!((applied.applied(), applied.skipped()), (2, 1));
        assert!(applied.is_applied(0) && !applied.is_applied(1));
        assert_eq!(effects(&host), vec![1, 3]);
        assert_eq!(host.once_mark(SCOPE, "test", 0), Some(3));
    }

    #[test]
    fn a_failed_round_trip_applies_nothing_and_then_commands_follow() {
        let host = MockHost::new();
        host.push_redis(Err(CapabilityError::Failed("down".into())));
        let b = batch(vec![event(1, None, 0)]);
        let build = || {
            let mut once = RedisOnce::new(SCOPE);
            once.event(&b.events.get(0).unwrap())
                .cmd("INCR")
                .arg("dc:x");
            once
        };
        assert!(build().apply(&host).is_err());
        assert_eq!(host.once_mark(SCOPE, "test", 0), None);
        let mut once = build();
        once.then().cmd("EXPIRE").arg("dc:x").arg(60);
        let applied = once.apply(&host).unwrap();
        assert_eq!(applied.applied(), 1);
        assert_eq!(applied.replies, vec![Reply::Nil]);
        assert!(
            matches!(host.calls().last(), Some(Call::Redis { commands, .. }) if commands[0][0] == "EXPIRE")
        );
        // Scripts cannot nest.
        let mut nested = RedisOnce::new(SCOPE);
        nested
            .event_at(5, None, Commands::new())
            .cmd("EVAL")
            .arg("return 1")
            .arg(0);
        assert!(matches!(
            nested.apply(&host),
            Err(CapabilityError::NotGranted(_))
        ));
    }

    #[test]
    fn the_eval_declares_every_key_once() {
        let b = batch(vec![event(70_000, None, 0), event(70_001, None, 0)]);
        let mut once = RedisOnce::new(SCOPE)
            .backfill_ttl_seconds(60)
            .legacy_markers("old:");
        for e in b.events.iter() {
            once.event(&e)
                .cmd("HINCRBY")
                .args(["dc:h", "f", "1"])
                .cmd("MSET")
                .args(["dc:a", "1", "dc:b", "2"])
                .cmd("ZUNIONSTORE")
                .args(["dc:z", "2", "dc:a", "dc:b", "WEIGHTS", "1", "1"]);
        }
        let cmd = once.eval_command().unwrap();
        let text: Vec<String> = cmd
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(text[0], "EVAL");
        assert_eq!(text[1], SCRIPT);
        let n: usize = text[2].parse().unwrap();
        let keys = &text[3..3 + n];
        assert_eq!(
            keys,
            [
                "dc:once:marks",
                "dc:once:backfilled:1",
                "dc:once:live:1",
                "old:70000",
                "dc:h",
                "dc:a",
                "dc:b",
                "dc:z",
                "old:70001"
            ]
        );
        let argv = &text[3 + n..];
        assert_eq!(&argv[..3], ["60", "86400", "2"]);
        // Event 1: id, field, offset, backfill bitmap index, bit, live bitmap index, old marker
        // index, commands.
        assert_eq!(
            &argv[3..11],
            ["70000", "test/0", "70000", "2", "4464", "3", "4", "3"]
        );
        assert_eq!(&argv[11..17], ["4", "vkvv", "HINCRBY", "5", "f", "1"]);
        assert_eq!(&argv[17..24], ["5", "vkvkv", "MSET", "6", "1", "7", "2"]);
        assert_eq!(argv[25], "vkvkkvvv");
        // A backfilled event names no live bitmap.
        let mut back = RedisOnce::new(SCOPE);
        back.event_at(5, None, Commands::new());
        let cmd = back.eval_command().unwrap();
        assert_eq!(cmd[2], b"2", "marks and the backfill bitmap only");
        assert_eq!(cmd[5 + 3 + 5], b"0");
        assert_eq!(
            key_mask(&command(&["DEL", "a", "b"])).unwrap(),
            [false, true, true]
        );
        assert_eq!(key_mask(&command(&["PING"])).unwrap(), [false]);
    }

    #[test]
    fn replies_are_read_per_event() {
        let mut once = RedisOnce::new(SCOPE);
        once.event_at(1, None, vec![]);
        once.event_at(2, None, vec![]);
        let ok = once.parse_reply(&Reply::Data(b"al".to_vec())).unwrap();
        assert_eq!(
            ok.events,
            vec![(1, Outcome::Applied), (2, Outcome::CoveredByLive)]
        );
        assert!(once.parse_reply(&Reply::Data(b"a".to_vec())).is_err());
        assert!(once.parse_reply(&Reply::Data(b"ax".to_vec())).is_err());
        assert!(once.parse_reply(&Reply::Integer(1)).is_err());
        for o in [
            Outcome::Applied,
            Outcome::Replayed,
            Outcome::AppliedByBackfill,
            Outcome::CoveredByLive,
            Outcome::LegacyMarker,
            Outcome::Resent,
        ] {
            assert_eq!(Outcome::from_code(o.code()), Some(o));
        }
    }

    /// The script against a real Redis gives the outcomes MockHost gives, on a sequence of
    /// live, replayed, backfilled and old-marker deliveries; and its bookkeeping is what the
    /// docs say. `FANOUT_TEST_REDIS=127.0.0.1:56379 cargo test -p fanout-sdk`; skipped without.
    #[test]
    fn the_script_on_redis_matches_the_mock() {
        let Some(redis) = crate::testing::RedisServerHost::from_env(0) else {
            eprintln!("FANOUT_TEST_REDIS unset: skipped");
            return;
        };
        let scope = format!(
            "sdk-once-{}-{}:",
            std::process::id(),
            crate::time::now_micros()
        );
        let mock = MockHost::new();
        mock.insert_key(&format!("{scope}old:{}", 3));
        redis.cmd(&["SET", &format!("{scope}old:{}", 3), "1"]);
        let evs: Vec<_> = (1..=12).map(|id| event(id, None, 0)).collect();
        let resend = event(13, None, 0);
        let live = |ids: std::ops::RangeInclusive<usize>| {
            batch_at(evs[ids].iter().map(|e| (e, at("t", 0, e.event_id * 10))))
        };
        let back =
            |ids: std::ops::RangeInclusive<usize>| batch_at(evs[ids].iter().map(|e| (e, None)));
        let deliveries = [
            back(4..=7),  // before the lane: 5..=8 applied by a backfill
            live(2..=5),  // 3..=6 live: 3 old marker, 4 new, 5 and 6 the backfill's
            live(2..=8),  // replay straddling the mark
            back(0..=11), // 1, 2 predate the stream (min live 3); the rest is covered
            back(0..=11), // again: nothing
            live(9..=11), // the rest of the stream
            // Producer re-sends at new offsets: 4 (applied live), 5 (its backfill bit answers),
            // 12 on another partition; 13 is new.
            batch_at([
                (&evs[3], at("t", 0, 130)),
                (&evs[4], at("t", 0, 140)),
                (&evs[11], at("t", 2, 1)),
                (&resend, at("t", 2, 2)),
            ]),
        ];
        let run = |host: &dyn Host, b: &Batch| {
            let mut once = RedisOnce::new(scope.clone()).legacy_markers(format!("{scope}old:"));
            for e in b.events.iter() {
                once.event(&e)
                    .cmd("RPUSH")
                    .arg(format_args!("{scope}log"))
                    .arg(e.event_id());
            }
            host.redis_once(once).expect("apply").events
        };
        let mut last = Vec::new();
        for (i, b) in deliveries.iter().enumerate() {
            last = run(&redis, b);
            assert_eq!(last, run(&mock, b), "delivery {i}");
        }
        use Outcome::*;
        assert_eq!(
            last,
            vec![
                (4, Resent),
                (5, AppliedByBackfill),
                (12, Resent),
                (13, Applied)
            ],
            "a backfill's bit answers first (5), the live bit catches the re-sends"
        );
        let log = redis.cmd(&["LRANGE", &format!("{scope}log"), "0", "-1"]);
        let ids = log.as_ints();
        assert_eq!(
            ids,
            vec![5, 6, 7, 8, 4, 9, 1, 2, 10, 11, 12, 13],
            "each event once, not 3, re-sends not again"
        );
        let marks = redis.cmd(&["HGETALL", &format!("{scope}marks")]);
        let text: Vec<String> = match marks {
            Reply::Array(items) => items
                .iter()
                .map(|s| match s {
                    crate::redis::Scalar::Data(d) => String::from_utf8_lossy(d).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        };
        let fields: HashMap<_, _> = text
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        assert_eq!(fields.len(), 3, "{fields:?}");
        assert_eq!(fields["t/0"], "140");
        assert_eq!(fields["t/2"], "2");
        assert_eq!(fields[MIN_LIVE_FIELD], "3");
        let ttl = redis
            .cmd(&["TTL", &format!("{scope}backfilled:0")])
            .as_int();
        assert!(ttl.is_some_and(|t| t > 600_000), "{ttl:?}");
        let ttl = redis.cmd(&["TTL", &format!("{scope}live:0")]).as_int();
        assert!(ttl.is_some_and(|t| t > 80_000 && t <= 86_400), "{ttl:?}");
        // A failing command: the events before it stay applied and marked, the call fails.
        redis.cmd(&["SET", &format!("{scope}str"), "x"]);
        let mut once = RedisOnce::new(scope.clone());
        once.event_at(100, at("t", 1, 1), vec![])
            .cmd("INCR")
            .arg(format_args!("{scope}n"));
        once.event_at(101, at("t", 1, 2), vec![])
            .cmd("HINCRBY")
            .arg(format_args!("{scope}str"))
            .args(["f", "1"]);
        let err = once.apply(&redis).unwrap_err();
        assert!(format!("{err:?}").contains("event 101"), "{err:?}");
        assert_eq!(
            redis
                .cmd(&["HGET", &format!("{scope}marks"), "t/1"])
                .as_string(),
            Some("1".into())
        );
        redis.delete_prefix(&scope);
    }
}
