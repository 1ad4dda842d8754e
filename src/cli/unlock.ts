import { openStore } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import type { Io } from "./render.ts";

export const usage = `cairn unlock <thread> [--force] [--store <uri>] [--json]

Break a thread's writer lock. A lock whose holder is gone (a dead process on this host) or whose lease ran
out is broken without --force; a live holder's only with --force. The holder that loses its lock writes
nothing more to the thread: its next write stops it with THREAD_LOCKED. Without a lock, says so and exits 0.
  --force   break the lock even though its holder looks alive (stuck, paused, or on another host)`;

export async function unlockCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("unlock", argv, { ...COMMON_OPTIONS, force: { type: "boolean", default: false } });
  if (values.help) return io.out(usage), 0;
  const thread = onePositional("unlock", positionals, "a thread id");
  const store = await openStore(values.store);
  try {
    const broken = await store.unlockThread(thread, { force: values.force });
    if (values.json) {
      io.out(JSON.stringify({ thread, store: store.uri, broken: broken ?? null }, null, 2));
      return 0;
    }
    if (!broken) io.out(`thread ${thread} has no writer lock in ${store.uri}: nothing to break`);
    else io.out(`broke the writer lock of thread ${thread}, held by pid ${broken.pid} on ${broken.host} since ${broken.since}; that process can no longer write to it`);
    return 0;
  } finally {
    await store.close();
  }
}
