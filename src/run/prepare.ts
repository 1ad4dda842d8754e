import { RunnableLambda, type Runnable, type RunnableConfig } from "@langchain/core/runnables";
import { isCommand, StateGraph, type BaseCheckpointSaver } from "@langchain/langgraph";
import { CairnError } from "../errors.ts";
import { findUnstorable, findUnstorableField, type UnstorableValue } from "../store/values.ts";
import { isWorkflow, taskIdOf, type Workflow } from "../workflow/builder.ts";
import { markSharedSignal, RunRuntime, type RunEvent } from "../workflow/instrument.ts";
import { RecordingSaver } from "./recording.ts";

/** Anything cairn can run: a cairn workflow, or a plain (uncompiled) LangGraph `StateGraph`. */
export type RunTarget = Workflow<any, string> | StateGraph<any, any, any, any, any, any>;

/** A graph compiled for one run, with its runtime and recording saver. */
export interface PreparedRun {
  name: string;
  steps: string[];
  workflow?: Workflow<any, string>;
  graph: ReturnType<StateGraph<any, any, any, any, any, any>["compile"]>;
  runtime: RunRuntime;
  saver: RecordingSaver;
  /** Whether a state channel accumulates through a reducer (restoring it needs an Overwrite). */
  isReducer(channel: string): boolean;
}

export function describeTarget(target: RunTarget): { name: string; steps: string[] } {
  if (isWorkflow(target)) return { name: target.name, steps: target.steps };
  const graph = asStateGraph(target);
  return { name: "graph", steps: Object.keys(graph.nodes) };
}

/** Accept an uncompiled StateGraph, or a compiled one (its builder is used). */
export function asStateGraph(target: unknown): StateGraph<any, any, any, any, any, any> {
  if (target instanceof StateGraph) return target;
  const builder = (target as { builder?: unknown } | null)?.builder;
  if (builder instanceof StateGraph) return builder;
  if (typeof target === "object" && target !== null && "nodes" in target && "compile" in target && "channels" in target) {
    return target as StateGraph<any, any, any, any, any, any>;
  }
  throw new CairnError("GRAPH_LOAD_FAILED", `Expected a cairn workflow or a LangGraph StateGraph, got ${describeValue(target)}.`);
}

export function describeValue(value: unknown): string {
  if (value === undefined) return "undefined";
  if (value === null) return "null";
  if (typeof value === "object") return `an object (${(value as object).constructor?.name ?? "Object"})`;
  return `a ${typeof value}`;
}

export function prepareRun(
  target: RunTarget,
  saver: BaseCheckpointSaver,
  thread: string,
  signal: AbortSignal,
  emit: (event: RunEvent) => void,
  setup: (runtime: RunRuntime) => void = () => {},
): PreparedRun {
  if (isWorkflow(target)) {
    const runtime = new RunRuntime(thread, signal, emit, (node) => target.stepOfNode(node));
    runtime.pricing = target.pricing;
    setup(runtime);
    const recording = new RecordingSaver(saver, runtime, target.name);
    runtime.flushWrites = () => recording.flush();
    const builder = target.toStateGraph(runtime);
    const graph = builder.compile({ checkpointer: recording, name: target.name });
    return {
      name: target.name,
      steps: target.steps,
      workflow: target,
      graph,
      runtime,
      saver: recording,
      isReducer: (c) => isReducerChannel(builder, c),
    };
  }
  const builder = asStateGraph(target);
  const runtime = new RunRuntime(thread, signal, emit);
  setup(runtime);
  const name = "graph";
  // A workflow's steps are checked as they return (see the builder); a plain graph's writes here.
  const recording = new RecordingSaver(saver, runtime, name, { checkValues: true });
  runtime.flushWrites = () => recording.flush();
  const graph = compileInstrumented(builder, runtime, recording);
  return {
    name,
    steps: Object.keys(builder.nodes),
    graph,
    runtime,
    saver: recording,
    isReducer: (c) => isReducerChannel(builder, c),
  };
}

/**
 * Compile a plain StateGraph with every node wrapped by the run's runtime. The user's graph object is
 * left as it was: the wrappers are put in for the compile only (compile copies node runnables out).
 */
function compileInstrumented(builder: StateGraph<any, any, any, any, any, any>, runtime: RunRuntime, saver: BaseCheckpointSaver) {
  const nodes = builder.nodes as Record<string, { runnable: Runnable }>;
  const originals = new Map<string, Runnable>();
  for (const [name, spec] of Object.entries(nodes)) {
    originals.set(name, spec.runnable);
    const inner = spec.runnable;
    spec.runnable = RunnableLambda.from(async (input: unknown, config?: RunnableConfig) =>
      // No retries of cairn's own: a plain graph keeps exactly the retry policy its author gave it.
      runtime.task(
        name,
        undefined,
        taskIdOf(config),
        async () => {
          markSharedSignal(config);
          const output: unknown = await inner.invoke(input, { ...config, signal: runtime.signal });
          checkNodeOutput(name, output);
          return output;
        },
        { retry: false },
      ),
    ).withConfig({ runName: name }) as unknown as Runnable;
  }
  try {
    return builder.compile({ checkpointer: saver });
  } finally {
    for (const [name, runnable] of originals) nodes[name]!.runnable = runnable;
  }
}

/**
 * Refuse a plain graph node's output that the store would not give back as it is, inside the node's
 * task: it fails like a failing node, before its writes are saved.
 */
function checkNodeOutput(node: string, output: unknown): void {
  if (typeof output !== "object" || output === null) return;
  // A Command carries its state update in `update`; a plain object is the update itself.
  const update = isCommand(output) ? output.update : output;
  let unstorable: UnstorableValue | undefined;
  if (Array.isArray(update)) {
    for (const pair of update as unknown[]) {
      if (!Array.isArray(pair) || typeof pair[0] !== "string") continue;
      unstorable = findUnstorable(pair[1], pair[0]);
      if (unstorable) break;
    }
  } else if (typeof update === "object" && update !== null && !Array.isArray(output)) {
    unstorable = findUnstorableField(update as Record<string, unknown>);
  }
  if (!unstorable) return;
  throw new CairnError(
    "INVALID_STATE",
    `Node "${node}" returned a value the store cannot keep exactly: ${unstorable.path} is ${unstorable.kind}. Instead, ${unstorable.instead}. Nothing of the node was saved; fix it and resume the thread.`,
    { step: node, path: unstorable.path, kind: unstorable.kind },
  );
}

function isReducerChannel(builder: StateGraph<any, any, any, any, any, any>, channel: string): boolean {
  const ch = (builder.channels as Record<string, unknown>)[channel];
  return ch !== undefined && ch?.constructor?.name === "BinaryOperatorAggregate";
}

/** The input a run starts with: laid over a workflow's `defaultInput` and validated (INVALID_INPUT). */
export function parseInput(target: RunTarget, input: unknown): unknown {
  if (isWorkflow(target)) {
    const wf = target;
    // The given input is laid over the workflow's default input, field by field.
    const given = input === undefined ? {} : input;
    if (typeof given !== "object" || given === null || Array.isArray(given)) return wf.parseInput(given);
    return wf.parseInput({ ...(wf.defaultInput ?? {}), ...given });
  }
  return input ?? {};
}

/**
 * The input as given, laid over a workflow's `defaultInput`, before the schema parses it: what a thread's
 * input fingerprint is taken from, so a schema change (a new default) is not mistaken for a new input.
 */
export function rawInput(target: RunTarget, input: unknown): unknown {
  if (!isWorkflow(target)) return input ?? {};
  const given = input === undefined ? {} : input;
  if (typeof given !== "object" || given === null || Array.isArray(given)) return given;
  return { ...(target.defaultInput ?? {}), ...given };
}
