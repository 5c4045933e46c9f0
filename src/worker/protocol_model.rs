//! A model of the claim / lease / visibility / run / settle protocol, checked exhaustively for
//! small cases with stateright.
//!
//! The holes in the exactly-once promise live in interleavings that example tests reach
//! only by luck, so the protocol is written here as a state machine and every interleaving
//! of a few deliveries, two workers, receives, claims, effects, completions, heartbeat
//! failures, lease and visibility expiry and a crash is explored. Time is abstract: a lease
//! or a visibility timeout may run out at any moment unless something keeps it alive (a
//! healthy heartbeat), and anything may happen between two steps of a worker.
//!
//! Today's rules use the worker's own [`plan_batch`] for what becomes of each delivery of a
//! claimed batch; the claim itself mirrors `CheckpointStore::claim_batch`'s statement, and
//! riding along, heartbeats and FIFO groups mirror `Shared::ride_along`, `renew` and
//! `run_group`. The rules of the code before the fix are kept beside them, documented, in a
//! test that expects their counterexamples: hole 1 (a mismatched delivery rides along and is
//! deleted), hole 2 (a mismatched first delivery releases its sibling's lease) and hole 3 (a
//! FIFO event whose lease expired while it waited runs anyway).
//!
//! Invariants:
//! - an effect runs at most once per event, unless a crash or a lost lease interrupted a run
//!   that had done it (at-least-once underneath; steps make that safe);
//! - no delivery is deleted unless its event is complete or failed (or it went to the DLQ);
//! - a delivery with another payload than its event's is never deleted as a duplicate;
//! - one holder at a time: at most one run of an event not told to stop.

use std::collections::HashMap;

use stateright::{Checker, Model, Property};

use super::batch::Parsed;
use super::claim::{Planned, plan_batch};
use super::config::PayloadMismatch;
use crate::message::{EventIdentity, RedriveMarkers};
use crate::sqs::ReceivedMessage;
use crate::store::{Claim, ClaimOutcome};

/// Whose rules: the code before the fix, or today's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Rules {
    Old,
    New,
}

/// A configuration to check.
#[derive(Clone, Debug)]
struct Protocol {
    rules: Rules,
    /// `(key, payload)` of each delivery, in send order (FIFO: one group, in this order).
    deliveries: Vec<(u8, u8)>,
    fifo: bool,
    /// Worker crashes allowed.
    crashes: u8,
    /// Whether heartbeats may fail.
    heartbeat_failures: bool,
    /// One operator redrive: delivery 0's handler may fail permanently (to the DLQ), and
    /// the redrive sends it back twice (SQS's duplicate delivery) as deliveries 1 and 2,
    /// of pass 1.
    redrive: bool,
    /// Claim statements allowed in all (bounds the lease tokens, so the state space).
    claims: u8,
}

/// A lease token: the claiming worker and the number of its claim statement.
type Token = (u8, u8);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Msg {
    /// A redriven copy, not sent yet.
    Reserved,
    Unsent,
    Visible,
    /// Received by this worker (and not deleted).
    InFlight(u8),
    /// Put back by a visibility change; visible again later.
    Hidden,
    Deleted,
    Dlq,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Status {
    InProgress,
    Complete,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Row {
    status: Status,
    payload: u8,
    owner: Option<Token>,
    live: bool,
    /// The latest pass that claimed it.
    pass: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Phase {
    /// FIFO: claimed, waiting for the events before it in its group.
    Waiting,
    Running,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Task {
    key: u8,
    payload: u8,
    pass: u8,
    token: Token,
    /// The delivery that runs, and the ones sharing its fate.
    deliveries: Vec<u8>,
    riders: Vec<u8>,
    phase: Phase,
    effect_done: bool,
    /// A heartbeat failed: the handler was told to stop.
    stopping: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WorkerState {
    alive: bool,
    /// Received, not claimed yet.
    batch: Vec<u8>,
    tasks: Vec<Task>,
    claims: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    msgs: Vec<Msg>,
    rows: Vec<Option<Row>>,
    workers: Vec<WorkerState>,
    /// Handler runs per event and pass (index `key * 2 + pass`).
    effects: Vec<u8>,
    /// Runs that had done their effect and were cut short (crash, lost lease), likewise.
    interrupted: Vec<u8>,
    crashes_left: u8,
    claims_left: u8,
    deleted_unsettled: bool,
    dropped_mismatch: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    Send(u8),
    Receive(u8),
    Claim(u8),
    /// FIFO: the next event of the worker's group starts.
    Start(u8),
    Effect(u8, u8),
    Finish(u8, u8),
    /// The handler failed permanently (redrive configuration).
    Fail(u8, u8),
    Redrive,
    HeartbeatFails(u8, u8),
    LeaseExpires(u8),
    VisibilityExpires(u8),
    Crash(u8),
}

const WORKERS: u8 = 2;

impl Protocol {
    fn key(&self, d: u8) -> u8 {
        self.deliveries[d as usize].0
    }

    fn payload(&self, d: u8) -> u8 {
        self.deliveries[d as usize].1
    }

    fn pass(&self, d: u8) -> u8 {
        u8::from(self.redrive && d > 0)
    }

    fn keys(&self) -> usize {
        self.deliveries
            .iter()
            .map(|&(k, _)| k as usize + 1)
            .max()
            .unwrap_or(0)
    }

    /// Whether the lease of `key` is kept alive by a heartbeat: its holder's worker runs it
    /// healthily (today also: it waits in a FIFO group whose running event is healthy).
    fn lease_protected(&self, state: &State, key: u8) -> bool {
        let Some(Row {
            owner: Some((w, _)),
            ..
        }) = &state.rows[key as usize]
        else {
            return false;
        };
        let worker = &state.workers[*w as usize];
        let owner = state.rows[key as usize].as_ref().and_then(|r| r.owner);
        worker.alive
            && worker
                .tasks
                .iter()
                .any(|t| t.key == key && Some(t.token) == owner && self.kept_alive(worker, t))
    }

    fn kept_alive(&self, worker: &WorkerState, task: &Task) -> bool {
        match task.phase {
            Phase::Running => !task.stopping,
            // Old: a waiting FIFO event was renewed by nothing.
            Phase::Waiting => {
                self.rules == Rules::New
                    && worker
                        .tasks
                        .iter()
                        .any(|t| t.phase == Phase::Running && !t.stopping)
            }
        }
    }

    /// Whether delivery `d`, in flight at worker `w`, is kept hidden by a heartbeat.
    fn visibility_protected(&self, state: &State, w: u8, d: u8) -> bool {
        let worker = &state.workers[w as usize];
        worker.alive
            && (worker.batch.contains(&d)
                || worker.tasks.iter().any(|t| {
                    self.kept_alive(worker, t)
                        && (t.deliveries.contains(&d)
                            // Old: riders' receipts were never renewed.
                            || (self.rules == Rules::New && t.riders.contains(&d)))
                }))
    }

    /// The claim statement for one key: which delivery's request is made, and whether the
    /// row is taken. Mirrors `claim_batch`: today a row is taken only for a delivery with
    /// its stored payload (the first such in the batch), and a retry recognises its token.
    fn claim_row(&self, row: &Option<Row>, batch: &[u8], key: u8, token: Token) -> Option<u8> {
        let of_key = batch.iter().copied().filter(|&d| self.key(d) == key);
        // The batch's latest pass counts for the key (see `claim_batch`).
        let pass = batch
            .iter()
            .filter(|&&d| self.key(d) == key)
            .map(|&d| self.pass(d))
            .max()?;
        let chosen = match (self.rules, row) {
            (Rules::New, Some(row)) => of_key
                .clone()
                .find(|&d| self.payload(d) == row.payload)
                .or_else(|| of_key.clone().next()),
            _ => of_key.clone().next(),
        }?;
        let chosen_pass = pass;
        let takes = match row {
            None => true,
            Some(row) => {
                let state_allows = match row.status {
                    Status::InProgress => !row.live || row.owner == Some(token),
                    // Only a redrive of a later pass reopens a failed event.
                    Status::Failed => chosen_pass > row.pass,
                    Status::Complete => false,
                };
                state_allows && (self.rules == Rules::Old || row.payload == self.payload(chosen))
            }
        };
        takes.then_some(chosen)
    }

    fn claim(&self, state: &mut State, w: u8) {
        let batch = std::mem::take(&mut state.workers[w as usize].batch);
        let token = (w, state.workers[w as usize].claims);
        state.workers[w as usize].claims += 1;
        state.claims_left -= 1;
        let mut outcomes: HashMap<u8, ClaimOutcome> = HashMap::new();
        let mut keys: Vec<u8> = batch.iter().map(|&d| self.key(d)).collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            let row = state.rows[key as usize].clone();
            let outcome = match self.claim_row(&row, &batch, key, token) {
                Some(chosen) => {
                    let payload = row.as_ref().map_or(self.payload(chosen), |r| r.payload);
                    let pass = batch
                        .iter()
                        .filter(|&&d| self.key(d) == key)
                        .map(|&d| self.pass(d))
                        .chain(row.as_ref().map(|r| r.pass))
                        .max()
                        .unwrap_or(0);
                    state.rows[key as usize] = Some(Row {
                        status: Status::InProgress,
                        payload,
                        owner: Some(token),
                        live: true,
                        pass,
                    });
                    ClaimOutcome::Claimed(Claim {
                        attempts: 1,
                        resumed: row.is_some(),
                        steps: serde_json::Value::Array(vec![]),
                        stored_payload_sha256: payload.to_string(),
                    })
                }
                None => {
                    let row = row.expect("an untaken key has a row");
                    match row.status {
                        Status::Complete => ClaimOutcome::Complete {
                            stored_payload_sha256: row.payload.to_string(),
                        },
                        Status::Failed => ClaimOutcome::Failed {
                            stored_payload_sha256: row.payload.to_string(),
                        },
                        Status::InProgress => ClaimOutcome::Busy {
                            retry_after: std::time::Duration::ZERO,
                            run_remaining: std::time::Duration::ZERO,
                            stored_payload_sha256: Some(row.payload.to_string()),
                        },
                    }
                }
            };
            outcomes.insert(key, outcome);
        }
        match self.rules {
            Rules::New => self.settle_plan_new(state, w, token, &batch, outcomes),
            Rules::Old => self.settle_plan_old(state, w, token, &batch, &outcomes),
        }
    }

    /// Today's rules: the worker's own `plan_batch` decides.
    fn settle_plan_new(
        &self,
        state: &mut State,
        w: u8,
        token: Token,
        batch: &[u8],
        outcomes: HashMap<u8, ClaimOutcome>,
    ) {
        let parsed: Vec<Parsed> = batch
            .iter()
            .enumerate()
            .map(|(position, &d)| parsed(d, self.key(d), self.payload(d), self.pass(d), position))
            .collect();
        let outcomes: HashMap<String, ClaimOutcome> = outcomes
            .into_iter()
            .map(|(k, o)| (k.to_string(), o))
            .collect();
        for planned in plan_batch(parsed, &outcomes, PayloadMismatch::DeadLetter) {
            match planned {
                Planned::Run {
                    parsed: runner,
                    siblings,
                    ..
                } => {
                    let d = delivery(&runner);
                    let mut deliveries = vec![d];
                    deliveries.extend(siblings.iter().map(delivery));
                    self.add_task(state, w, token, d, deliveries);
                }
                Planned::Mismatch(p, _) => state.msgs[delivery(&p) as usize] = Msg::Dlq,
                Planned::Duplicate(p) => self.delete(state, delivery(&p)),
                Planned::Busy(p, ..) => {
                    let d = delivery(&p);
                    // `ride_along`: a run here with the same payload takes it, another
                    // payload is a mismatch, else it is put back.
                    let worker = &mut state.workers[w as usize];
                    let run = worker
                        .tasks
                        .iter_mut()
                        .find(|t| t.key == self.key(d) && t.phase == Phase::Running);
                    match run {
                        Some(t) if t.payload == self.payload(d) => t.riders.push(d),
                        Some(_) => state.msgs[d as usize] = Msg::Dlq,
                        None => state.msgs[d as usize] = Msg::Hidden,
                    }
                }
                Planned::Unkeyed(p) | Planned::NoRow(p) => {
                    state.msgs[delivery(&p) as usize] = Msg::Hidden
                }
            }
        }
    }

    /// The rules of the code before the fix (issue "Holes in the exactly-once promise"):
    /// the claim was made for the first delivery of a key whatever its payload; a delivery
    /// whose payload differed from a claimed row's went to the DLQ and *released the
    /// batch's lease*; a busy delivery rode along with a run here whatever its payload.
    fn settle_plan_old(
        &self,
        state: &mut State,
        w: u8,
        token: Token,
        batch: &[u8],
        outcomes: &HashMap<u8, ClaimOutcome>,
    ) {
        let mut runs: HashMap<u8, usize> = HashMap::new();
        let mut tasks: Vec<(u8, Vec<u8>)> = Vec::new();
        for &d in batch {
            let key = self.key(d);
            if let Some(&i) = runs.get(&key) {
                if self.payload(tasks[i].1[0]) == self.payload(d) {
                    tasks[i].1.push(d);
                } else {
                    state.msgs[d as usize] = Msg::Dlq;
                }
                continue;
            }
            let stored = outcomes[&key]
                .stored_payload_sha256()
                .map(|s| s.parse::<u8>().expect("model payloads"));
            match &outcomes[&key] {
                ClaimOutcome::Claimed(_) if stored != Some(self.payload(d)) => {
                    state.msgs[d as usize] = Msg::Dlq;
                    let row = state.rows[key as usize].as_mut().expect("claimed");
                    if row.owner == Some(token) {
                        row.owner = None;
                        row.live = false;
                    }
                }
                ClaimOutcome::Claimed(_) => {
                    runs.insert(key, tasks.len());
                    tasks.push((d, vec![d]));
                }
                ClaimOutcome::Complete { .. } if stored != Some(self.payload(d)) => {
                    state.msgs[d as usize] = Msg::Dlq
                }
                ClaimOutcome::Complete { .. } | ClaimOutcome::Failed { .. } => {
                    self.delete(state, d)
                }
                ClaimOutcome::Busy { .. } => {
                    let worker = &mut state.workers[w as usize];
                    match worker
                        .tasks
                        .iter_mut()
                        .find(|t| t.key == key && t.phase == Phase::Running)
                    {
                        Some(t) => t.riders.push(d),
                        None => state.msgs[d as usize] = Msg::Hidden,
                    }
                }
            }
        }
        for (d, deliveries) in tasks {
            self.add_task(state, w, token, d, deliveries);
        }
    }

    fn add_task(&self, state: &mut State, w: u8, token: Token, d: u8, deliveries: Vec<u8>) {
        let worker = &mut state.workers[w as usize];
        // FIFO: a group's events run one at a time, in order.
        let phase = if self.fifo && !worker.tasks.is_empty() {
            Phase::Waiting
        } else {
            Phase::Running
        };
        worker.tasks.push(Task {
            key: self.key(d),
            payload: self.payload(d),
            pass: self.pass(d),
            token,
            deliveries,
            riders: Vec::new(),
            phase,
            effect_done: false,
            stopping: false,
        });
    }

    /// Delete a delivery as settled: only sound when its event is complete (or it is a
    /// duplicate of a complete one) and it carries the event's payload.
    fn delete(&self, state: &mut State, d: u8) {
        match &state.rows[self.key(d) as usize] {
            Some(row) if row.status != Status::InProgress => {
                if row.payload != self.payload(d) {
                    state.dropped_mismatch = true;
                }
            }
            _ => state.deleted_unsettled = true,
        }
        state.msgs[d as usize] = Msg::Deleted;
    }

    /// A task stops: its event's run was cut short if it had done the effect.
    fn interrupt(state: &mut State, task: &Task) {
        if task.effect_done {
            state.interrupted[task.key as usize * 2 + task.pass as usize] += 1;
        }
    }

    fn finish(&self, state: &mut State, w: u8, t: usize) {
        let task = state.workers[w as usize].tasks.remove(t);
        let row = state.rows[task.key as usize]
            .as_mut()
            .expect("a running event has a row");
        if row.owner == Some(task.token) && row.status == Status::InProgress {
            row.status = Status::Complete;
            row.live = false;
            for &d in task.deliveries.iter().chain(&task.riders) {
                self.delete(state, d);
            }
        } else {
            // Lease lost: the completion is fenced out and nothing is deleted.
            Self::interrupt(state, &task);
        }
    }

    /// The handler failed permanently: fenced by the lease, the event is marked failed, its
    /// message goes to the DLQ and the deliveries sharing its fate are deleted.
    fn fail(&self, state: &mut State, w: u8, t: usize) {
        let task = state.workers[w as usize].tasks.remove(t);
        let row = state.rows[task.key as usize]
            .as_mut()
            .expect("a running event has a row");
        if row.owner == Some(task.token) && row.status == Status::InProgress {
            row.status = Status::Failed;
            row.owner = None;
            row.live = false;
            let (runner, rest) = task.deliveries.split_first().expect("a runner");
            state.msgs[*runner as usize] = Msg::Dlq;
            for &d in rest.iter().chain(&task.riders) {
                self.delete(state, d);
            }
        } else {
            Self::interrupt(state, &task);
        }
    }

    /// FIFO: the next event of the group starts. Today it starts only if its lease is still
    /// this claim's (`start_run`); otherwise it is left to its new holder and the rest of the
    /// group is handed back. Before the fix it simply started.
    fn start(&self, state: &mut State, w: u8) {
        let first = &state.workers[w as usize].tasks[0];
        let held = state.rows[first.key as usize]
            .as_ref()
            .is_some_and(|r| r.owner == Some(first.token) && r.status == Status::InProgress);
        if self.rules == Rules::Old || held {
            if held && let Some(row) = state.rows[first.key as usize].as_mut() {
                row.live = true;
            }
            state.workers[w as usize].tasks[0].phase = Phase::Running;
            return;
        }
        let tasks = std::mem::take(&mut state.workers[w as usize].tasks);
        for task in tasks.iter().skip(1) {
            let row = state.rows[task.key as usize].as_mut().expect("claimed");
            if row.owner == Some(task.token) {
                row.owner = None;
                row.live = false;
                for &d in &task.deliveries {
                    state.msgs[d as usize] = Msg::Visible;
                }
            }
        }
    }

    fn crash(state: &mut State, w: u8) {
        let worker = &mut state.workers[w as usize];
        worker.alive = false;
        worker.batch.clear();
        let tasks = std::mem::take(&mut worker.tasks);
        for task in &tasks {
            Self::interrupt(state, task);
        }
        state.crashes_left -= 1;
    }

    /// The lease of `key` runs out; a run told to stop is stopped with it.
    fn expire_lease(state: &mut State, key: u8) {
        let row = state.rows[key as usize]
            .as_mut()
            .expect("a lease has a row");
        row.live = false;
        let owner = row.owner;
        for w in 0..WORKERS as usize {
            let stopped: Vec<Task> = state.workers[w]
                .tasks
                .iter()
                .filter(|t| Some(t.token) == owner && t.stopping)
                .cloned()
                .collect();
            state.workers[w]
                .tasks
                .retain(|t| !(Some(t.token) == owner && t.stopping));
            for task in &stopped {
                Self::interrupt(state, task);
            }
        }
    }
}

/// The parsed form of model delivery `d` for `plan_batch`.
fn parsed(d: u8, key: u8, payload: u8, pass: u8, position: usize) -> Parsed {
    Parsed {
        message: ReceivedMessage {
            message_id: d.to_string(),
            receipt_handle: format!("receipt-{d}"),
            body: String::new(),
            system_attributes: HashMap::new(),
            message_attributes: HashMap::new(),
        },
        markers: RedriveMarkers {
            redriven: pass > 0,
            redrive_count: u32::from(pass),
            ..RedriveMarkers::default()
        },
        identity: Ok(EventIdentity {
            key: key.to_string(),
            unwrapped: None,
            json: None,
            fingerprint: payload.to_string(),
            field_digests: None,
        }),
        position,
        span: tracing::Span::none(),
    }
}

fn delivery(parsed: &Parsed) -> u8 {
    parsed
        .message
        .message_id
        .parse()
        .expect("model message ids")
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let keys = self.keys();
        let msgs = (0..self.deliveries.len() as u8)
            .map(|d| {
                if self.pass(d) > 0 {
                    Msg::Reserved
                } else {
                    Msg::Unsent
                }
            })
            .collect();
        vec![State {
            msgs,
            rows: vec![None; keys],
            workers: vec![
                WorkerState {
                    alive: true,
                    batch: Vec::new(),
                    tasks: Vec::new(),
                    claims: 0,
                };
                WORKERS as usize
            ],
            effects: vec![0; keys * 2],
            interrupted: vec![0; keys * 2],
            crashes_left: self.crashes,
            claims_left: self.claims,
            deleted_unsettled: false,
            dropped_mismatch: false,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        for (d, msg) in state.msgs.iter().enumerate() {
            let d = d as u8;
            match msg {
                // FIFO: sent in order.
                Msg::Unsent
                    if !self.fifo || state.msgs[..d as usize].iter().all(|m| *m != Msg::Unsent) =>
                {
                    actions.push(Action::Send(d))
                }
                Msg::Hidden => actions.push(Action::VisibilityExpires(d)),
                Msg::InFlight(w) if !self.visibility_protected(state, *w, d) => {
                    actions.push(Action::VisibilityExpires(d))
                }
                _ => {}
            }
        }
        for w in 0..WORKERS {
            let worker = &state.workers[w as usize];
            if !worker.alive {
                continue;
            }
            if worker.batch.is_empty() && !self.receivable(state).is_empty() {
                actions.push(Action::Receive(w));
            }
            if !worker.batch.is_empty() && state.claims_left > 0 {
                actions.push(Action::Claim(w));
            }
            if self.fifo
                && worker
                    .tasks
                    .first()
                    .is_some_and(|t| t.phase == Phase::Waiting)
            {
                actions.push(Action::Start(w));
            }
            for (t, task) in worker.tasks.iter().enumerate() {
                if task.phase != Phase::Running {
                    continue;
                }
                if !task.effect_done && !task.stopping {
                    actions.push(Action::Effect(w, t as u8));
                }
                if task.effect_done {
                    actions.push(Action::Finish(w, t as u8));
                    if self.redrive {
                        actions.push(Action::Fail(w, t as u8));
                    }
                }
                if self.heartbeat_failures && !task.stopping {
                    actions.push(Action::HeartbeatFails(w, t as u8));
                }
            }
            if state.crashes_left > 0 {
                actions.push(Action::Crash(w));
            }
        }
        if self.redrive && state.msgs[0] == Msg::Dlq {
            actions.push(Action::Redrive);
        }
        for (key, row) in state.rows.iter().enumerate() {
            if let Some(row) = row
                && row.status == Status::InProgress
                && row.live
                && !self.lease_protected(state, key as u8)
            {
                actions.push(Action::LeaseExpires(key as u8));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Send(d) => state.msgs[d as usize] = Msg::Visible,
            Action::Receive(w) => {
                for d in self.receivable(&state) {
                    state.msgs[d as usize] = Msg::InFlight(w);
                    state.workers[w as usize].batch.push(d);
                }
            }
            Action::Claim(w) => self.claim(&mut state, w),
            Action::Start(w) => self.start(&mut state, w),
            Action::Effect(w, t) => {
                let task = &mut state.workers[w as usize].tasks[t as usize];
                task.effect_done = true;
                state.effects[task.key as usize * 2 + task.pass as usize] += 1;
            }
            Action::Finish(w, t) => self.finish(&mut state, w, t as usize),
            Action::Fail(w, t) => self.fail(&mut state, w, t as usize),
            Action::Redrive => {
                // Sent back (twice: SQS may deliver a redrive more than once), then deleted.
                state.msgs[0] = Msg::Deleted;
                for msg in state.msgs.iter_mut().skip(1) {
                    *msg = Msg::Visible;
                }
            }
            Action::HeartbeatFails(w, t) => {
                state.workers[w as usize].tasks[t as usize].stopping = true
            }
            Action::LeaseExpires(key) => Self::expire_lease(&mut state, key),
            Action::VisibilityExpires(d) => state.msgs[d as usize] = Msg::Visible,
            Action::Crash(w) => Self::crash(&mut state, w),
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "an effect runs once a pass unless a run was cut short",
                |_, s: &State| {
                    s.effects
                        .iter()
                        .zip(&s.interrupted)
                        .all(|(effects, cut)| *effects <= 1 + cut)
                },
            ),
            Property::always("nothing is deleted unsettled", |_, s: &State| {
                !s.deleted_unsettled
            }),
            Property::always("a mismatched payload is never dropped", |_, s: &State| {
                !s.dropped_mismatch
            }),
            Property::always("one holder at a time", |_, s: &State| {
                let mut holders: HashMap<u8, usize> = HashMap::new();
                for worker in s.workers.iter().filter(|w| w.alive) {
                    for task in &worker.tasks {
                        if task.phase == Phase::Running && !task.stopping {
                            *holders.entry(task.key).or_default() += 1;
                        }
                    }
                }
                holders.values().all(|&n| n <= 1)
            }),
        ]
    }
}

impl Protocol {
    /// What a receive returns: every visible delivery; on a FIFO queue, only while nothing
    /// of the group is in flight (SQS blocks a group meanwhile).
    fn receivable(&self, state: &State) -> Vec<u8> {
        if self.fifo
            && state
                .msgs
                .iter()
                .any(|m| matches!(m, Msg::InFlight(_) | Msg::Hidden))
        {
            return Vec::new();
        }
        (0..state.msgs.len() as u8)
            .filter(|&d| state.msgs[d as usize] == Msg::Visible)
            .collect()
    }
}

/// Check `protocol` exhaustively; the names of the properties it violates.
fn violations(protocol: Protocol) -> Vec<&'static str> {
    let checker = protocol.checker().spawn_bfs().join();
    let mut found: Vec<&'static str> = checker.discoveries().keys().copied().collect();
    found.sort_unstable();
    found
}

/// One key, two payloads among three deliveries (the seeds' webhook race: two deliveries of
/// one object microseconds apart, possibly with different content), a crash, heartbeat
/// failures, lease and visibility expiry.
fn payloads(rules: Rules, deliveries: &[(u8, u8)]) -> Protocol {
    Protocol {
        rules,
        deliveries: deliveries.to_vec(),
        fifo: false,
        crashes: 1,
        heartbeat_failures: true,
        redrive: false,
        claims: 3,
    }
}

/// A FIFO group of events of different keys, one delivery each.
fn fifo_group(rules: Rules, events: u8) -> Protocol {
    Protocol {
        rules,
        deliveries: (0..events).map(|k| (k, 0)).collect(),
        fifo: true,
        crashes: 0,
        heartbeat_failures: events <= 2,
        redrive: false,
        claims: 3,
    }
}

#[test]
fn todays_rules_hold_for_deliveries_with_two_payloads() {
    for deliveries in [
        &[(0, 0), (0, 1), (0, 0)][..],
        &[(0, 1), (0, 0), (0, 0)][..],
        &[(0, 0), (0, 0), (0, 0)][..],
    ] {
        let found = violations(payloads(Rules::New, deliveries));
        assert!(found.is_empty(), "{deliveries:?}: {found:?}");
    }
}

/// A redrive of a failed event, delivered twice: the handler runs once in the first pass
/// and once more in the redrive's, however the copies and workers interleave.
fn redrive(rules: Rules) -> Protocol {
    Protocol {
        rules,
        deliveries: vec![(0, 0), (0, 0), (0, 0)],
        fifo: false,
        crashes: 1,
        heartbeat_failures: false,
        redrive: true,
        claims: 3,
    }
}

#[test]
fn todays_rules_hold_for_a_fifo_group() {
    // Groups of two with heartbeat failures; of three without (the same rules, a larger
    // state space).
    for events in [2, 3] {
        let found = violations(fifo_group(Rules::New, events));
        assert!(found.is_empty(), "{events} events: {found:?}");
    }
}

#[test]
fn todays_rules_hold_for_a_redrive_delivered_twice() {
    let found = violations(redrive(Rules::New));
    assert!(found.is_empty(), "{found:?}");
}

/// The rules before the fix, kept to show what the model finds in them: holes 1 and 2 with
/// two payloads (a mismatched rider dropped; a sibling's lease released, so a second holder
/// runs the event), hole 3 in a FIFO group (an event run after its lease expired).
#[test]
fn the_old_rules_have_the_three_holes() {
    let found = violations(payloads(Rules::Old, &[(0, 0), (0, 1), (0, 0)]));
    assert!(
        found.contains(&"a mismatched payload is never dropped"),
        "hole 1: {found:?}"
    );
    let found = violations(payloads(Rules::Old, &[(0, 1), (0, 0), (0, 0)]));
    assert!(found.contains(&"one holder at a time"), "hole 2: {found:?}");
    let found = violations(fifo_group(Rules::Old, 2));
    assert!(
        found.contains(&"an effect runs once a pass unless a run was cut short"),
        "hole 3: {found:?}"
    );
}
