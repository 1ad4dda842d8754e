import { isEmptyUsage, openStore, stateAt } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { describeUsage } from "./progress.ts";
import { renderState, type Io } from "./render.ts";

export const usage = `cairn inspect <thread> [--step <name> | --checkpoint <id>] [--store <uri>] [--json]

Show a thread's state: the latest, right after a step (its last run on the current branch), or at a checkpoint.
  --json   print the state values as JSON`;

export async function inspectCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("inspect", argv, { ...COMMON_OPTIONS, step: { type: "string" }, checkpoint: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const thread = onePositional("inspect", positionals, "a thread id");
  const store = await openStore(values.store);
  try {
    const state = await stateAt(store.saver, store.uri, thread, { step: values.step, checkpoint: values.checkpoint });
    if (values.json) {
      io.out(JSON.stringify(state.values, null, 2));
      return 0;
    }
    io.out(`thread ${thread} · checkpoint ${state.checkpoint} · after step ${state.step} · ${state.ts}`);
    if (!isEmptyUsage(state.spent)) io.out(`spent so far: ${describeUsage(state.spent)}`);
    renderState(io, state.values);
    return 0;
  } finally {
    await store.close();
  }
}
