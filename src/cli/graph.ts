import { CairnError, graphSteps, loadGraph, openStore, threadSteps, workflowDiagram, type ThreadSteps } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import type { Io } from "./render.ts";

export const usage = `cairn graph <graph.ts> [--thread <id>] [--store <uri>] [--json]

Print the workflow as a Mermaid flowchart: paste it into a \`\`\`mermaid block (GitHub renders it) or mermaid.live.
Fan-outs are drawn as double-sided boxes, loops as edges back, the path past a step with a \`when\` dotted.
  --thread  colour each step by where that thread stands on its current branch: done, failed, running,
            pending or skipped; a fan-out under way shows its saved items (37/120 items)
  --json    print { mermaid, thread, steps: [{ name, kind, status, items? }] }`;

export async function graphCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("graph", argv, { ...COMMON_OPTIONS, thread: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const file = onePositional("graph", positionals, "a graph file (e.g. graphs/novel.ts)");
  if (values.thread !== undefined && values.thread.trim() === "") {
    throw new CairnError("INVALID_ARGUMENT", `--thread is empty. Pass a thread id from: cairn threads${values.store ? ` --store ${values.store}` : ""}`);
  }
  const target = await loadGraph(file);
  let marks: ThreadSteps | undefined;
  if (values.thread !== undefined) {
    const store = await openStore(values.store);
    try {
      marks = await threadSteps(target, store.saver, values.thread, store.uri);
    } finally {
      await store.close();
    }
    if (marks.otherWorkflow !== undefined) {
      io.err(`cairn: warning: thread ${values.thread} was run by workflow "${marks.otherWorkflow}", not the one in ${file}; its steps may not match these.`);
    }
  }
  const mermaid = workflowDiagram(target, marks);
  if (values.json) {
    const steps = marks?.steps ?? graphSteps(target).map((s) => ({ ...s, status: null }));
    io.out(JSON.stringify({ mermaid, thread: marks ? { id: marks.thread, status: marks.status } : null, steps }, null, 2));
    return 0;
  }
  io.out(mermaid);
  return 0;
}
