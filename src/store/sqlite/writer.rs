//! The single writer: every write of a [`SqliteStore`](super::SqliteStore)
//! runs on one thread that owns the only read-write connection, and
//! concurrent writes share transactions (group commit).
//!
//! Callers queue a task on a channel and await a one-shot reply. The thread
//! takes the first queued task, then everything else already queued (up to
//! the configured group size), runs them in order inside one `BEGIN
//! IMMEDIATE … COMMIT`, and replies to each only after `COMMIT` returned: an
//! `Ok` is a committed transaction, as durable as the configured
//! [`Durability`](super::Durability). While one group is being committed the
//! next one queues up, so the more callers write at once, the fewer
//! transactions (and syncs) each write costs.
//!
//! A failure must not take other callers down with it. If a task fails,
//! the group is rolled back, that task gets its error, and the others run
//! again as a group: a write that fails (a conflict, say a replayed message)
//! costs its group a rollback, not a sync per write. If `COMMIT` fails,
//! every task is run again in a transaction of its own, so each caller gets
//! the result of its own work.
//!
//! A [`Conflict`](StoreError::Conflict) is answered only against committed
//! state: callers read it as "another write committed first". In a group,
//! a task may conflict with an earlier task's uncommitted write (a retried
//! `PutMessage` beside the first try), and that write may then fail after
//! all. So a task that conflicts while others share its transaction is set
//! aside, and once the group is done (committed or failed) it runs again in
//! a transaction of its own; that run's result is its answer. Conflicts are
//! rare (replays, lost races), so the extra transaction is too. So is a
//! fenced task refused as [`Superseded`](StoreError::Superseded): the
//! take-over it lost to may be an uncommitted task of its group.
//!
//! A task's work may run more than once for these reasons; it never
//! half-applies, since its transaction commits or rolls back whole.
//!
//! A caller may stop waiting (its future dropped by a timeout): its task
//! stays queued and is applied all the same. The store's reads must not miss
//! it, so a caller that stops waiting before its answer counts its task as
//! abandoned, the thread uncounts it once answered (the reply finding no one
//! to take it), and while any is counted a read first queues a barrier,
//! answered once everything queued before it has been answered
//! ([`Writer::settled`]). Abandoned writes are rare, so reads almost never
//! wait. Work that must run outside a transaction (the scrub's `VACUUM`)
//! is queued the same way, and runs between two groups ([`Writer::alone`]).
//!
//! The one-shot replies are `futures-channel`'s: runtime-agnostic, small,
//! maintained with the `futures` crates, and a reply whose sender is dropped
//! (the writer thread gone) completes with `Canceled` instead of hanging.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll, ready};
use std::thread::JoinHandle;

use futures_channel::oneshot;
use rusqlite::Connection;

use super::codec::store_error;
use super::open_files::Named;
use super::{GroupCommits, writes};
use crate::store::{StoreError, WriterId};

/// A unit of work for the writer thread, with its reply.
trait Task: Send {
    /// The writer the task's batch is fenced by, if any: the task runs
    /// only while that is the store's writer (see `Storage::take_over`).
    fn fence(&self) -> Option<WriterId>;

    /// Do the work inside the current transaction; keep the output for the
    /// reply. An error aborts the transaction.
    fn run(&mut self, conn: &Connection) -> Result<(), StoreError>;

    /// The transaction committed: send the output.
    fn succeed(self: Box<Self>);

    /// The work failed or its transaction did not commit: send `error`.
    fn fail(self: Box<Self>, error: StoreError);
}

/// What the thread takes off its queue.
enum Job {
    /// A write.
    Write(Box<dyn Task>),
    /// Work outside any transaction, once every job queued before it has
    /// been answered, and before any queued after it runs: a barrier, or
    /// maintenance (a `VACUUM` cannot run inside a transaction). It sends
    /// its own reply.
    Alone(Box<dyn FnOnce(&Connection) + Send>),
}

struct Typed<T, F> {
    work: F,
    output: Option<T>,
    reply: Reply<T>,
    fence: Option<WriterId>,
}

/// A task's reply, and the count of abandoned tasks it uncounts if its
/// caller stopped waiting (see [`Answer`]).
struct Reply<T> {
    sender: oneshot::Sender<Result<T, StoreError>>,
    abandoned: Arc<AtomicI64>,
}

impl<T> Reply<T> {
    fn send(self, result: Result<T, StoreError>) {
        // The caller stopped waiting; the work is done either way.
        if self.sender.send(result).is_err() {
            self.abandoned.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A caller's wait for its task's reply. Dropped before the reply, it counts
/// the task as abandoned, then closes the channel, and uncounts it if a
/// reply came in before the close (the task is done); otherwise the
/// thread's reply fails, and uncounts it then. Counted before the close, a
/// task is never uncounted before it is counted, so the count never falls
/// below the number of abandoned tasks unanswered (it may exceed it for a
/// moment, costing a read a barrier).
struct Answer<'w, T> {
    receiver: oneshot::Receiver<Result<T, StoreError>>,
    abandoned: &'w AtomicI64,
    answered: bool,
}

impl<T> Future for Answer<'_, T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let reply = ready!(Pin::new(&mut self.receiver).poll(cx));
        self.answered = true;
        Poll::Ready(reply.map_err(|_| writer_gone())?)
    }
}

impl<T> Drop for Answer<'_, T> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.abandoned.fetch_add(1, Ordering::AcqRel);
        self.receiver.close();
        // Closed, the channel holds a reply only if one was sent before the
        // close: the task is done. (A thread that stopped with the task
        // unanswered lands nothing more: a barrier does not wait for it.)
        if matches!(self.receiver.try_recv(), Ok(Some(_))) {
            self.abandoned.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<T, F> Task for Typed<T, F>
where
    T: Send,
    F: FnMut(&Connection) -> Result<T, StoreError> + Send,
{
    fn fence(&self) -> Option<WriterId> {
        self.fence
    }

    fn run(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.output = None;
        self.output = Some((self.work)(conn)?);
        Ok(())
    }

    // The work (and what it holds) is let go before the reply: a caller
    // answered finds whatever it left behind it done.
    fn succeed(self: Box<Self>) {
        let Self {
            work,
            output,
            reply,
            ..
        } = *self;
        drop(work);
        let result = output
            .ok_or_else(|| StoreError::Backend("write task committed without running".into()));
        reply.send(result);
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let Self { work, reply, .. } = *self;
        drop(work);
        reply.send(Err(error));
    }
}

/// The handle to the writer thread. Dropping it lets queued work finish,
/// then closes the connection and joins the thread.
pub(super) struct Writer {
    /// The file written: no work runs once its path names another.
    file: Named,
    queue: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    counts: Arc<Counts>,
    /// Tasks whose callers stopped waiting and that are not answered yet.
    abandoned: Arc<AtomicI64>,
}

/// What the writer has committed so far.
#[derive(Debug, Default)]
struct Counts {
    transactions: AtomicU64,
    writes: AtomicU64,
}

impl Counts {
    fn snapshot(&self) -> GroupCommits {
        GroupCommits {
            transactions: self.transactions.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }
}

fn writer_gone() -> StoreError {
    StoreError::Backend("the SQLite writer thread has stopped".into())
}

impl Writer {
    /// Start the writer thread on `conn`, a connection to `file`, grouping
    /// at most `max_group` tasks per transaction. No transaction begins
    /// once the file's path names another (see [`Named`]).
    pub(super) fn start(conn: Connection, file: Named, max_group: usize) -> std::io::Result<Self> {
        let (queue, tasks) = mpsc::channel();
        let counts = Arc::new(Counts::default());
        let counted = counts.clone();
        let checked = file.clone();
        let thread = std::thread::Builder::new()
            .name("custodian-sqlite-writer".into())
            .spawn(move || run(conn, &checked, tasks, max_group.max(1), &counted))?;
        Ok(Self {
            file,
            queue: Some(queue),
            thread: Some(thread),
            counts,
            abandoned: Arc::default(),
        })
    }

    /// Transactions committed so far, and the writes they held.
    pub(super) fn committed(&self) -> GroupCommits {
        self.counts.snapshot()
    }

    /// Run `work` in a write transaction; resolves once that transaction
    /// committed (or failed). `work` may run more than once (see the module
    /// docs), each time in a fresh transaction.
    pub(super) async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_fenced(None, work).await
    }

    /// [`write`](Self::write), fenced by `fence`: if that is not the
    /// store's writer when `work` would run, it fails as
    /// [`StoreError::Superseded`] instead.
    pub(super) async fn write_fenced<T, F>(
        &self,
        fence: Option<WriterId>,
        work: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (sender, receiver) = oneshot::channel();
        let task = Box::new(Typed {
            work,
            output: None,
            reply: Reply {
                sender,
                abandoned: self.abandoned.clone(),
            },
            fence,
        });
        self.queue
            .as_ref()
            .ok_or_else(writer_gone)?
            .send(Job::Write(task))
            .map_err(|_| writer_gone())?;
        Answer {
            receiver,
            abandoned: &self.abandoned,
            answered: false,
        }
        .await
    }

    /// Run `work` on the writer's connection outside any transaction,
    /// between two groups: every write queued before it is answered first,
    /// and every write queued after it waits for it. For what cannot run in
    /// a transaction (`VACUUM`); it does not wait for the file's write lock
    /// behind the store's own writes. Refused once the file's path names
    /// another (see [`Named`]).
    pub(super) async fn alone<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let file = self.file.clone();
        self.queue
            .as_ref()
            .ok_or_else(writer_gone)?
            .send(Job::Alone(Box::new(move |conn| {
                let _ = reply.send(file.check().and_then(|()| work(conn)));
            })))
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Resolves once every task whose caller stopped waiting for it before
    /// this call has landed or failed; at once when there is none. A
    /// stopped thread lands nothing more, so it is not waited for.
    pub(super) async fn settled(&self) {
        if self.abandoned.load(Ordering::Acquire) <= 0 {
            return;
        }
        let _ = self.alone(|_| Ok(())).await;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop once it has drained it.
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    conn: Connection,
    file: &Named,
    jobs: mpsc::Receiver<Job>,
    max_group: usize,
    counts: &Counts,
) {
    // Room for a default group up front; a larger limit grows it as tasks
    // come (reserving `usize::MAX` would kill the thread).
    let mut group: Vec<Box<dyn Task>> = Vec::with_capacity(max_group.min(256));
    let mut after = None;
    while let Ok(first) = jobs.recv() {
        match first {
            Job::Write(task) => group.push(task),
            Job::Alone(work) => {
                work(&conn);
                continue;
            }
        }
        // A group ends at work to run alone, which runs once the group is
        // answered (a task set aside in it included).
        while group.len() < max_group {
            match jobs.try_recv() {
                Ok(Job::Write(task)) => group.push(task),
                Ok(Job::Alone(work)) => {
                    after = Some(work);
                    break;
                }
                Err(_) => break,
            }
        }
        match file.check() {
            Ok(()) => commit_group(&conn, &mut group, counts),
            Err(e) => group.drain(..).for_each(|t| t.fail(duplicate(&e))),
        }
        if let Some(work) = after.take() {
            work(&conn);
        }
    }
    // Closing the last connection checkpoints the log into the file.
    let _ = conn.close();
}

/// Where a group's transaction failed.
enum Failure {
    /// Could not start it: nothing ran.
    Begin(StoreError),
    /// The task at this index failed: rolled back.
    Task(usize, StoreError),
    /// The commit failed: rolled back.
    Commit(StoreError),
}

/// Run `tasks` in one transaction. On failure everything is rolled back.
fn attempt(conn: &Connection, tasks: &mut [Box<dyn Task>]) -> Result<(), Failure> {
    // Cached: these two run once per transaction, parsed once per connection.
    let sql = |statement: &str| {
        conn.prepare_cached(statement)
            .and_then(|mut s| s.execute([]))
            .map(drop)
            .map_err(store_error)
    };
    sql("BEGIN IMMEDIATE").map_err(Failure::Begin)?;
    // The store's writer, read when a fenced task first needs it: once a
    // transaction, as nothing else writes while it holds the lock, unless
    // a task in it (an unfenced one: a take-over) changes it.
    let mut store_writer = None;
    let outcome = tasks
        .iter_mut()
        .enumerate()
        .try_for_each(|(i, t)| {
            let fence = t.fence();
            if let Some(fence) = fence {
                let current = match store_writer {
                    Some(current) => current,
                    None => {
                        *store_writer.insert(writes::writer(conn).map_err(|e| Failure::Task(i, e))?)
                    }
                };
                if current != Some(fence) {
                    return Err(Failure::Task(i, StoreError::Superseded));
                }
            }
            t.run(conn).map_err(|e| Failure::Task(i, e))?;
            if fence.is_none() {
                store_writer = None;
            }
            Ok(())
        })
        .and_then(|()| sql("COMMIT").map_err(Failure::Commit));
    outcome.inspect_err(|_| {
        if !conn.is_autocommit() {
            // If even the rollback fails the connection is unusable; the
            // next BEGIN reports that to the next callers.
            let _ = conn.execute_batch("ROLLBACK");
        }
    })
}

/// The same error again, for another caller (`StoreError` is not `Clone`).
fn duplicate(e: &StoreError) -> StoreError {
    match e {
        StoreError::Conflict => StoreError::Conflict,
        StoreError::Superseded => StoreError::Superseded,
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
    }
}

/// Run `task` in a transaction of its own and reply with the result.
fn alone(conn: &Connection, mut task: Box<dyn Task>, committed: impl Fn(usize)) {
    match attempt(conn, std::slice::from_mut(&mut task)) {
        Ok(()) => {
            committed(1);
            task.succeed();
        }
        Err(Failure::Begin(e) | Failure::Task(_, e) | Failure::Commit(e)) => task.fail(e),
    }
}

/// Commit `group` (emptied on return), replying to every task. A task that
/// conflicts within a group is answered by a run of its own afterwards (see
/// the module docs).
fn commit_group(conn: &Connection, group: &mut Vec<Box<dyn Task>>, counts: &Counts) {
    let committed = |writes: usize| {
        counts.transactions.fetch_add(1, Ordering::Relaxed);
        counts.writes.fetch_add(writes as u64, Ordering::Relaxed);
    };
    // Conflicts with what may be another task's uncommitted write.
    let mut conflicted = Vec::new();
    while !group.is_empty() {
        match attempt(conn, group) {
            Ok(()) => {
                committed(group.len());
                group.drain(..).for_each(|t| t.succeed());
            }
            Err(Failure::Begin(e)) => {
                // Nothing ran; running the tasks one by one would only repeat
                // the wait that failed, once per task.
                group.drain(..).for_each(|t| t.fail(duplicate(&e)));
            }
            // Perhaps with another task's write: it goes again later, alone.
            Err(Failure::Task(i, StoreError::Conflict | StoreError::Superseded))
                if group.len() > 1 =>
            {
                conflicted.push(group.remove(i));
            }
            // Its own failure: the others go again without it.
            Err(Failure::Task(i, e)) => group.remove(i).fail(e),
            Err(Failure::Commit(e)) if group.len() == 1 => {
                if let Some(task) = group.pop() {
                    task.fail(e);
                }
            }
            Err(Failure::Commit(_)) => {
                for task in group.drain(..) {
                    alone(conn, task, committed);
                }
            }
        }
    }
    for task in conflicted {
        alone(conn, task, committed);
    }
}

#[cfg(test)]
pub(super) mod testing {
    //! Drive the group logic directly, without the thread.
    use super::*;

    /// One task's work.
    pub(crate) type Work<T> = Box<dyn FnMut(&Connection) -> Result<T, StoreError> + Send>;

    /// Commit the works in `works` as one group, as the thread would, and
    /// return each one's result, and the transactions and writes committed.
    pub(crate) fn commit_as_group<T: Send + 'static>(
        conn: &Connection,
        works: Vec<Work<T>>,
    ) -> (Vec<Result<T, StoreError>>, GroupCommits) {
        commit_fenced_as_group(conn, works.into_iter().map(|w| (None, w)).collect())
    }

    /// [`commit_as_group`], each work fenced by the writer beside it.
    pub(crate) fn commit_fenced_as_group<T: Send + 'static>(
        conn: &Connection,
        works: Vec<(Option<WriterId>, Work<T>)>,
    ) -> (Vec<Result<T, StoreError>>, GroupCommits) {
        let mut answers = Vec::new();
        let mut group: Vec<Box<dyn Task>> = Vec::new();
        for (fence, work) in works {
            let (sender, answer) = oneshot::channel();
            group.push(Box::new(Typed {
                work,
                output: None,
                reply: Reply {
                    sender,
                    abandoned: Arc::default(),
                },
                fence,
            }));
            answers.push(answer);
        }
        let counts = Counts::default();
        commit_group(conn, &mut group, &counts);
        let results = answers
            .into_iter()
            .map(|mut a| match a.try_recv() {
                Ok(Some(r)) => r,
                _ => Err(StoreError::Backend("no reply".into())),
            })
            .collect();
        (results, counts.snapshot())
    }
}
