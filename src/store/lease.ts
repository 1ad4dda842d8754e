import { AsyncLocalStorage } from "node:async_hooks";
import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import { CairnError } from "../errors.ts";
import { processState } from "./process.ts";

/**
 * One writer per thread, on every store. A process that runs a thread holds the thread's lock (a
 * lease): it names the holder (pid, host, since) and expires unless the holder renews it, which it does
 * every third of the lease while its event loop runs. A lock is taken over when its holder is gone
 * (a dead pid on this host) or its lease expired (a holder on another host, or one stopped or stuck);
 * `cairn unlock --force` breaks a live one.
 *
 * Losing the lock is safe because every write is fenced: on SQLite and Postgres the checkpoint rows and
 * a touch of the lease row (`UPDATE … WHERE token = mine`) commit in one transaction, so a holder whose
 * lease was taken over has its write rolled back; the file store's fence is in its journal (see
 * file.ts, "generations").
 */
export interface LockHolder {
  pid: number;
  host: string;
  /** When the holder took the lock (ISO time). */
  since: string;
  /** When its lease ends unless renewed (ISO time); absent on locks written by older versions. */
  expires?: string;
}

/** The lease a holder takes, in milliseconds: `CAIRN_LEASE_MS`, else 30 seconds. */
export function leaseMs(): number {
  const raw = process.env.CAIRN_LEASE_MS;
  const n = raw === undefined || raw === "" ? NaN : Number(raw);
  return Number.isFinite(n) && n >= 50 ? Math.floor(n) : 30_000;
}

/** Whether a lock may be taken over: its holder is gone, or its lease ran out. */
export function isStale(holder: LockHolder, now = Date.now()): boolean {
  if (processState(holder.pid, holder.host) === "dead") return true;
  return holder.expires !== undefined && Date.parse(holder.expires) < now;
}

export function describeHolder(holder: LockHolder): string {
  const who = holder.pid === process.pid && holder.host === hostname() ? `this process (pid ${holder.pid})` : `pid ${holder.pid} on ${holder.host}`;
  return `${who} since ${holder.since}`;
}

/** Another process holds the thread: fail fast, naming it and the ways on. */
export function threadLocked(thread: string, holder: LockHolder, where: string, extra: Record<string, unknown> = {}): CairnError {
  const until = holder.expires ? `, lease until ${holder.expires}` : "";
  return new CairnError(
    "THREAD_LOCKED",
    `Thread "${thread}" is being written by ${describeHolder(holder)}${until} (${where}); a thread has one writer at a time. ` +
      `Wait for that run to finish or stop it. If that process is stuck, \`cairn unlock ${thread} --force\` breaks its lock (it then cannot write again).`,
    { thread, holder, hint: `cairn unlock ${thread} --force`, ...extra },
  );
}

/** This process's lock was taken over or broken: it stops, and nothing more of it is recorded. */
export function lostLock(thread: string, where: string, extra: Record<string, unknown> = {}): CairnError {
  return new CairnError(
    "THREAD_LOCKED",
    `This process lost the writer lock of thread "${thread}" (${where}: its lease ran out, or it was broken or taken over by another process), ` +
      `so it stopped writing and its write was not recorded. Check \`cairn threads\` for another run of this thread before resuming it.`,
    { thread, lost: true, ...extra },
  );
}

/** A lock held by this process: renewed in the background until released. */
export interface HeldLock {
  thread: string;
  token: string;
  holder: LockHolder;
  timer?: ReturnType<typeof setInterval>;
}

/**
 * The leases of the SQL stores, in a `cairn_leases` table beside the checkpoints. Drivers are not
 * imported here; the store hands in small query functions.
 */
export interface LeaseTable {
  /** Take the thread's lock for this process, or fail with THREAD_LOCKED naming the live holder. */
  acquire(thread: string): Promise<void>;
  /** The holder of a live or stale lock, if any. */
  holder(thread: string): Promise<(LockHolder & { stale: boolean; mine: boolean }) | undefined>;
  /** Break the thread's lock: a stale one always, a live one only with `force`. Returns what was broken. */
  breakLock(thread: string, force: boolean): Promise<LockHolder | undefined>;
  /** Refuse (THREAD_LOCKED) when another process holds a live lock of the thread. */
  refuseIfHeld(thread: string): Promise<void>;
  /** The token this process holds for the thread, if any. */
  tokenOf(thread: string): string | undefined;
  /**
   * Run one checkpoint or task write of the thread, fenced by the lock this process holds as the write
   * starts. The token is taken now, not when the write reaches its commit: LangGraph has a step's task
   * writes and its checkpoint under way at once, so when one of them is refused the run ends and its
   * lock is released while the other is still on its way, and that one must still be checked against
   * the lock it was started under, not find no lock held and pass as a write by a process that never
   * held one.
   */
  write<R>(thread: string, fn: () => R): R;
  /** The write under way in this async context (see `write`): its thread and the token it started under. */
  currentWrite(): { thread: string; token: string | undefined } | undefined;
  /** Release this process's lock of the thread, if it holds it. */
  release(thread: string): Promise<void>;
  /** Release every lock this process holds. */
  releaseAll(): Promise<void>;
}

interface LeaseRow {
  token: string;
  pid: number;
  host: string;
  since: string;
  expires: string;
}

/** The storage side of a lease table; each method is one transaction. */
export interface LeaseBackend {
  where: string;
  /** In one transaction: read the thread's row (locked), let `decide` choose, write its answer. */
  swap(thread: string, decide: (row: LeaseRow | undefined) => LeaseRow | "keep"): Promise<void>;
  read(thread: string): Promise<LeaseRow | undefined>;
  /** Push the lease's end out; false when the row no longer carries this token. */
  renew(thread: string, token: string, expires: string): Promise<boolean>;
  remove(thread: string, token: string | undefined): Promise<void>;
}

export function leaseTable(backend: LeaseBackend): LeaseTable {
  const held = new Map<string, HeldLock>();
  const writes = new AsyncLocalStorage<{ thread: string; token: string | undefined }>();
  const holderOf = (row: LeaseRow): LockHolder => ({ pid: Number(row.pid), host: row.host, since: row.since, expires: row.expires });
  const expiresFromNow = () => new Date(Date.now() + leaseMs()).toISOString();

  return {
    async acquire(thread) {
      if (held.has(thread)) return;
      const token = randomUUID();
      const mine: LeaseRow = { token, pid: process.pid, host: hostname(), since: new Date().toISOString(), expires: expiresFromNow() };
      let refused: LockHolder | undefined;
      await backend.swap(thread, (row) => {
        refused = undefined;
        if (row && !isStale(holderOf(row))) {
          refused = holderOf(row);
          return "keep";
        }
        return mine;
      });
      if (refused) throw threadLocked(thread, refused, backend.where);
      const lock: HeldLock = { thread, token, holder: holderOf(mine) };
      const every = Math.max(10, Math.floor(leaseMs() / 3));
      lock.timer = setInterval(() => {
        // A failed renewal is not reported here: the next write's fence says whether the lock is still ours.
        backend.renew(thread, token, expiresFromNow()).catch(() => {});
      }, every);
      lock.timer.unref();
      held.set(thread, lock);
    },
    async holder(thread) {
      const row = await backend.read(thread);
      if (!row) return undefined;
      const h = holderOf(row);
      return { ...h, stale: isStale(h), mine: held.get(thread)?.token === row.token };
    },
    async breakLock(thread, force) {
      const row = await backend.read(thread);
      if (!row) return undefined;
      const h = holderOf(row);
      if (!force && !isStale(h)) throw threadLocked(thread, h, backend.where);
      await backend.remove(thread, row.token);
      return h;
    },
    async refuseIfHeld(thread) {
      const row = await backend.read(thread);
      if (!row || row.token === held.get(thread)?.token) return;
      const h = holderOf(row);
      if (!isStale(h)) throw threadLocked(thread, h, backend.where);
    },
    tokenOf: (thread) => held.get(thread)?.token,
    write: (thread, fn) => writes.run({ thread, token: held.get(thread)?.token }, fn),
    currentWrite: () => writes.getStore(),
    async release(thread) {
      const lock = held.get(thread);
      if (!lock) return;
      held.delete(thread);
      clearInterval(lock.timer);
      await backend.remove(lock.thread, lock.token).catch(() => {});
    },
    async releaseAll() {
      for (const lock of held.values()) {
        clearInterval(lock.timer);
        await backend.remove(lock.thread, lock.token).catch(() => {});
      }
      held.clear();
    },
  };
}

/** The row a write finds: its own token (fine), none or a stale one (fine), or another live holder's. */
export function fenceVerdict(thread: string, where: string, mineToken: string | undefined, row: LeaseRow | undefined): CairnError | undefined {
  if (mineToken !== undefined) return row?.token === mineToken ? undefined : lostLock(thread, where);
  if (!row) return undefined;
  const h: LockHolder = { pid: Number(row.pid), host: row.host, since: row.since, expires: row.expires };
  return isStale(h) ? undefined : threadLocked(thread, h, where);
}

export type { LeaseRow };
