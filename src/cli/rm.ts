import { CairnError, latestTuple, openStore, readHistory, removeThread } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { formatAge } from "./prune.ts";
import { flag, formatBytes, plural, shellArg, type Io } from "./render.ts";

export const usage = `cairn rm <thread> [--yes] [--dry-run] [--grace <age>] [--store <uri>] [--json]

Delete a thread: all its checkpoints and step files, then the artifacts no other thread refers to. Asks first
on a terminal; elsewhere pass --yes. A thread another process is running is refused.
  --yes          do not ask
  --dry-run      show what would be removed, remove nothing
  --grace <age>  keep artifacts put less than this long ago, referenced or not (default 1h)`;

export async function rmCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("rm", argv, {
    ...COMMON_OPTIONS,
    yes: { type: "boolean", short: "y", default: false },
    "dry-run": { type: "boolean", default: false },
    grace: { type: "string" },
  });
  if (values.help) return io.out(usage), 0;
  const thread = onePositional("rm", positionals, "a thread id");
  const dryRun = values["dry-run"];
  const store = await openStore(values.store);
  try {
    await latestTuple(store.saver, thread, store.uri);
    if (!values.yes && !dryRun) {
      const checkpoints = (await readHistory(store.saver, thread)).length;
      const what = `thread ${thread} (${plural(checkpoints, "checkpoint")}, ${formatBytes(await store.threadBytes(thread))}) from ${store.uri}`;
      if (!io.ask) {
        const again = `cairn rm ${shellArg(thread)} --yes${values.store !== undefined ? ` ${flag("store", values.store)}` : ""}`;
        throw new CairnError("INVALID_ARGUMENT", `cairn rm removes ${what} for good; confirm with --yes: ${again}`, { thread });
      }
      const answer = await io.ask(`Remove ${what}? This cannot be undone. [y/N] `);
      if (!/^y(es)?$/i.test(answer.trim())) {
        io.err("Nothing was removed.");
        return 1;
      }
    }
    const removed = await removeThread(thread, { store, dryRun, grace: values.grace });
    if (values.json) {
      io.out(JSON.stringify(removed, null, 2));
      return 0;
    }
    const a = removed.artifacts;
    io.out(`${dryRun ? "would remove" : "removed"} thread ${thread}: ${plural(removed.checkpoints, "checkpoint")}, ${formatBytes(removed.bytesFreed)}`);
    const kept = `kept ${a.referenced} referenced${a.recent ? `, ${a.recent} put within the last ${formatAge(a.graceMs)}` : ""}`;
    io.out(`artifacts: ${dryRun ? "would remove" : "removed"} ${a.removed.length} that no checkpoint refers to${a.removed.length ? ` (${formatBytes(a.bytesFreed)})` : ""}; ${kept}`);
    io.out(`${dryRun ? "would free" : "freed"} ${formatBytes(removed.bytesFreed + a.bytesFreed)} in all${dryRun ? " (dry run: nothing was removed)" : ""}`);
    return 0;
  } finally {
    await store.close();
  }
}
