import { END, Overwrite, START, Send, StateGraph } from "@langchain/langgraph";
import { registry } from "@langchain/langgraph/zod";
import type { RunnableConfig } from "@langchain/core/runnables";
import { z } from "zod";
import { CairnError } from "../errors.ts";
import { markSharedSignal, type RetryPolicy, type RunRuntime, type TaskPolicy } from "./instrument.ts";
import { addUsage, isEmptyUsage, usageFrom, type Pricing, type Usage, type UsageReport } from "./usage.ts";
import type { ArtifactRef, PutArtifactOptions } from "../store/artifacts.ts";
import { findUnstorable, findUnstorableField, type UnstorableValue } from "../store/values.ts";

import { DONE_CHANNEL, FINGERPRINT_CHANNEL, gatherNode, mapChannel, undoChannel, USAGE_CHANNEL } from "../channels.ts";
import { hashOf } from "./hash.ts";

export { DONE_CHANNEL, gatherNode, mapChannel, undoChannel, USAGE_CHANNEL };

/** The record a step leaves the first time it finishes: the values of the fields it changed, as they were. */
export interface UndoRecord {
  fields: Record<string, unknown>;
  /** Fields the step set that had no value before it. */
  absent?: string[];
}

/** A small logger handed to steps; lines reach the run's event stream (and the CLI). */
export type StepLogger = (message: string) => void;

/** What a step gets besides the state. Kept small on purpose. */
export interface StepContext {
  /** The thread this run belongs to. */
  readonly thread: string;
  /** The step's name. */
  readonly step: string;
  /** Aborted when the run is cancelled. A failing sibling never aborts it. Pass it to model calls. */
  readonly signal: AbortSignal;
  readonly log: StepLogger;
  /** 1 on a step's first try; 2 or more when an earlier try of it (or of this item) failed, in this run or before. */
  readonly attempt: number;
  /** True when this run resumes an existing thread (after a crash, a failure, a stop, or from a step). */
  readonly resumed: boolean;
  /**
   * Report how far a long step is (`done` of `total` units, with an optional note). The CLI shows it as a
   * bar; programs see `progress` events.
   */
  progress(done: number, total?: number, message?: string): void;
  /**
   * Report spend that cairn cannot see by itself (an image or audio API, a model called over plain
   * HTTP). Chat model calls made through LangChain inside the step are counted automatically.
   */
  usage(report: UsageReport): void;
  /** Keep bytes (an image, audio, video) beside the checkpoints and get a small reference for the state. */
  readonly artifacts: StepArtifacts;
}

/** `ctx.artifacts`: binary outputs stored once per content hash in the run's store. */
export interface StepArtifacts {
  /** Store the bytes durably; put the returned reference in the state. */
  put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef>;
  /** The bytes of a reference, checked against its hash. */
  get(ref: ArtifactRef): Promise<Uint8Array>;
}

/** What a fan-out item gets: the step context plus its position in the list. */
export interface ItemContext extends StepContext {
  readonly index: number;
}

export type StepFn<S> = (state: S, ctx: StepContext) => Promise<Partial<S>> | Partial<S>;

/** Keys of S whose values are arrays: the fields a fan-out can gather into. */
type ArrayKeys<S> = { [K in keyof S]-?: NonNullable<S[K]> extends readonly unknown[] ? K : never }[keyof S] & string;
type ElementOf<T> = NonNullable<T> extends readonly (infer E)[] ? E : never;

export interface MapOptions<S, Item, K extends ArrayKeys<S>> {
  /** The items to fan out over, read from the state when the step starts. */
  over: (state: S) => readonly Item[];
  /** One task per item; items run in parallel and each finished item is checkpointed on its own. */
  run: (item: Item, ctx: ItemContext) => Promise<ElementOf<S[K]>> | ElementOf<S[K]>;
  /** The state field that receives the results, in item order. */
  into: K;
  /** At most this many items run at once (model APIs rate-limit). Default: all at once. */
  concurrency?: number;
  /**
   * Save finished items in batches of this many instead of one by one. The step boundary, a failure and
   * a stop still save everything. A hard crash (kill -9, power loss) loses the finished items not yet
   * written: up to `saveEvery - 1` waiting for their batch (a batch waits at most 2 seconds), plus any
   * batch whose write was under way; a resume runs them again. Default 1: every item is written as it
   * finishes. On the file store, items that finish together already share one fdatasync, so batching
   * gains little there (see bench/RESULTS.md).
   */
  saveEvery?: number;
}

export interface StepOptions<S> {
  /** Run the step only when this holds; otherwise the workflow goes on to the next step. */
  when?: (state: S) => boolean;
  /**
   * Retry policy for the step (for a fan-out: for each item). Default: transient failures (rate limits,
   * timeouts, 5xx) get 3 attempts with backoff; permanent ones fail at once. `false` never retries.
   */
  retry?: RetryPolicy | false;
  /**
   * What the step's output depends on besides the state: its prompt template, model name, temperature…
   * Any JSON value; cairn keeps a hash of it with each run of the step. When it changes, a resume of a
   * thread that already ran the step refuses and names the step as stale (rerun it with `--from-step`).
   */
  fingerprint?: unknown;
}

interface StepDef<S> {
  name: string;
  kind: "step" | "map";
  fn?: StepFn<S>;
  map?: MapOptions<S, unknown, ArrayKeys<S>>;
  when?: (state: S) => boolean;
  retry?: RetryPolicy | false;
  fingerprint?: unknown;
}

/** Where a route may lead, declared (`.route(from, to, { targets })`) or read from the route's source. */
interface RouteDef<S> {
  to: (state: S) => string;
  targets?: readonly string[];
}

/** A workflow's structure, as data: what `cairn graph` draws and what a thread's fingerprint records. */
export interface WorkflowShape {
  name: string;
  version: string | undefined;
  steps: StepShape[];
  routes: RouteShape[];
}

export interface StepShape {
  name: string;
  kind: "step" | "map";
  /** For a fan-out: the state field its results are gathered into. */
  into?: string;
  /** The step has a `when` condition: it may be skipped. */
  conditional: boolean;
  /** The step declares a fingerprint (its hash is recorded per run, not here). */
  fingerprinted: boolean;
}

export interface RouteShape {
  from: string;
  /** The steps (or "end") the route can lead to, in declaration order. */
  targets: string[];
  /** `declared`: given with the route; `inferred`: step names quoted in the route's source; `unknown`: neither. */
  targetsFrom: "declared" | "inferred" | "unknown";
}

/** The end of a route: no further step. */
export const END_OF_WORKFLOW = "end" as const;

type AnyZodObject = z.ZodObject<z.ZodRawShape>;

export interface WorkflowOptions<Schema extends AnyZodObject> {
  /** The zod schema of the state. Reducer fields use LangGraph's zod registry (see `appendList`). */
  state: Schema;
  /** Used by `cairn run` when no `--input` is given. */
  defaultInput?: z.input<Schema>;
  /** A version the workflow declares (bump it when its behaviour changes). */
  version?: string;
  /**
   * Anything else the whole workflow's output depends on (a model family, a style guide). Recorded with
   * the thread; a resume under a different value refuses until told `--force`, `--from-step` or a new thread.
   */
  fingerprint?: unknown;
  /**
   * Bring a state saved under an older version of the schema up to the current one. Called on resume
   * when the saved state no longer parses, with the saved fields and the `version` the thread was
   * started with; return the state in the current schema's shape (it is validated, then saved as a
   * `migrate` checkpoint before anything runs).
   */
  migrate?: (state: Record<string, unknown>, from: { version: string | undefined }) => Record<string, unknown>;
  /** Prices per million tokens by model name, for turning counted tokens into money. */
  pricing?: Pricing;
  /**
   * Once a run completes, when this is true or returns true for the final state (e.g. an input switch):
   * remove every checkpoint of the thread but the final one, then the artifacts only the removed ones
   * referred to. The final state stays readable (`cairn inspect`, `cairn artifacts`), and so do the
   * artifacts it refers to. For pipelines whose product is written out (a sheet, a book) and whose
   * intermediate states are not worth keeping.
   */
  cleanupOnSuccess?: boolean | ((state: z.infer<Schema>) => boolean);
  /**
   * Keep a thread to about its `keepLast` newest checkpoints while it runs. After each checkpoint, once
   * the thread holds `keepLast + max(keepLast, 10)` of them, it is pruned back to the `keepLast` newest
   * (so it never holds more than that, and the file store rewrites its journal once per
   * `max(keepLast, 10)` checkpoints, not every step); a run that completes is pruned to `keepLast`.
   * The newest checkpoint, which the run continues from, and its pending writes (a fan-out's saved
   * items) are never removed, so a crashed run resumes as usual, and `--from-step` rebuilds the state
   * before any step from the latest one. Artifacts are left to `cairn prune` / `gcArtifacts`.
   */
  retention?: { keepLast: number };
}

/**
 * A typed, named-step workflow that compiles to a LangGraph `StateGraph`. Step names accumulate in the
 * `Names` type parameter, so `fromStep` and routes only accept names the workflow declares.
 *
 * @example
 * ```ts
 * export default workflow("moral-video", { state: State })
 *   .step("story_generator", writeStory)
 *   .map("character_designer", { over: (s) => s.segments, run: designScene, into: "scenes" })
 *   .step("video_assembler", assemble);
 * ```
 */
export class Workflow<Schema extends AnyZodObject, Names extends string = never> {
  /** Brand for recognising workflows across module copies. */
  readonly kind = "cairn.workflow" as const;
  readonly name: string;
  readonly schema: Schema;
  readonly defaultInput: z.input<Schema> | undefined;
  readonly version: string | undefined;
  readonly pricing: Pricing | undefined;
  readonly cleanupOnSuccess: WorkflowOptions<Schema>["cleanupOnSuccess"];
  readonly retention: WorkflowOptions<Schema>["retention"];
  readonly fingerprint: unknown;
  readonly migrate: WorkflowOptions<Schema>["migrate"];
  private readonly options: WorkflowOptions<Schema>;
  private readonly defs: StepDef<z.infer<Schema>>[];
  private readonly routes: Map<string, RouteDef<z.infer<Schema>>>;

  constructor(
    name: string,
    options: WorkflowOptions<Schema>,
    defs: StepDef<z.infer<Schema>>[] = [],
    routes = new Map<string, RouteDef<z.infer<Schema>>>(),
  ) {
    this.name = name;
    this.options = options;
    this.schema = options.state;
    this.defaultInput = options.defaultInput;
    this.version = options.version;
    this.pricing = options.pricing;
    this.cleanupOnSuccess = options.cleanupOnSuccess;
    const keepLast = options.retention?.keepLast;
    if (options.retention && !(Number.isInteger(keepLast) && keepLast! >= 1)) {
      throw new CairnError("INVALID_ARGUMENT", `Workflow "${name}" has retention.keepLast ${String(keepLast)}; use a whole number of 1 or more.`);
    }
    this.retention = options.retention;
    this.fingerprint = options.fingerprint;
    this.migrate = options.migrate;
    this.defs = defs;
    this.routes = routes;
  }

  /** The declared step names, in order. */
  get steps(): Names[] {
    return this.defs.map((d) => d.name as Names);
  }

  /** Add a step: a pure async function from the state to a partial update. */
  step<N extends string>(name: N, fn: StepFn<z.infer<Schema>>, options: StepOptions<z.infer<Schema>> = {}): Workflow<Schema, Names | N> {
    return this.add({ name, kind: "step", fn, when: options.when, retry: options.retry, fingerprint: options.fingerprint });
  }

  /** Add a fan-out step: one task per item of `over`, results gathered into `into` in item order. */
  map<N extends string, Item, K extends ArrayKeys<z.infer<Schema>>>(
    name: N,
    options: MapOptions<z.infer<Schema>, Item, K> & StepOptions<z.infer<Schema>>,
  ): Workflow<Schema, Names | N> {
    if (options.concurrency !== undefined && !(Number.isInteger(options.concurrency) && options.concurrency >= 1)) {
      throw new CairnError("INVALID_ARGUMENT", `Fan-out step "${name}" has concurrency ${String(options.concurrency)}; use a whole number of 1 or more.`, { step: name });
    }
    if (options.saveEvery !== undefined && !(Number.isInteger(options.saveEvery) && options.saveEvery >= 1)) {
      throw new CairnError("INVALID_ARGUMENT", `Fan-out step "${name}" has saveEvery ${String(options.saveEvery)}; use a whole number of 1 or more (1 saves each item as it finishes).`, { step: name });
    }
    return this.add({ name, kind: "map", map: options as unknown as MapOptions<z.infer<Schema>, unknown, ArrayKeys<z.infer<Schema>>>, when: options.when, retry: options.retry, fingerprint: options.fingerprint });
  }

  /**
   * Decide where the workflow goes after `from` (a branch, or a loop back to an earlier step). Without a
   * route a step is followed by the next declared step. `targets` lists where the route can lead, for
   * `cairn graph` and the thread's fingerprint; without it they are read from the step names quoted in
   * the route's source.
   */
  route(
    from: Names,
    to: (state: z.infer<Schema>) => Names | typeof END_OF_WORKFLOW,
    options: { targets?: readonly (Names | typeof END_OF_WORKFLOW)[] } = {},
  ): Workflow<Schema, Names> {
    if (!this.defs.some((d) => d.name === from)) throw unknownStep(this.name, from, this.steps);
    for (const t of options.targets ?? []) {
      if (t !== END_OF_WORKFLOW && !this.defs.some((d) => d.name === t)) throw unknownStep(this.name, t, this.steps);
    }
    const routes = new Map(this.routes);
    routes.set(from, { to, targets: options.targets });
    return new Workflow<Schema, Names>(this.name, this.options, this.defs, routes);
  }

  /** The workflow's structure as data: steps in order, their kinds, and where each route can lead. */
  describe(): WorkflowShape {
    const names = this.defs.map((d) => d.name);
    return {
      name: this.name,
      version: this.version,
      steps: this.defs.map((d) => {
        const shape: StepShape = { name: d.name, kind: d.kind, conditional: d.when !== undefined, fingerprinted: d.fingerprint !== undefined };
        if (d.kind === "map") shape.into = d.map!.into;
        return shape;
      }),
      routes: [...this.routes].map(([from, r]) => {
        if (r.targets) return { from, targets: [...r.targets], targetsFrom: "declared" as const };
        const targets = quotedNames(r.to.toString(), [...names, END_OF_WORKFLOW]);
        return { from, targets, targetsFrom: targets.length ? ("inferred" as const) : ("unknown" as const) };
      }),
    };
  }

  /** The declared fingerprint of a step (undefined when it declares none). */
  stepFingerprint(step: string): unknown {
    return this.defs.find((d) => d.name === step)?.fingerprint;
  }

  private add<N extends string>(def: StepDef<z.infer<Schema>>): Workflow<Schema, Names | N> {
    if (!/^[A-Za-z][A-Za-z0-9_-]*$/.test(def.name)) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Step name "${def.name}" in workflow "${this.name}" is not allowed: use letters, digits, "_" and "-", starting with a letter.`,
        { step: def.name },
      );
    }
    if (this.defs.some((d) => d.name === def.name)) {
      throw new CairnError("INVALID_ARGUMENT", `Workflow "${this.name}" already has a step named "${def.name}". Step names must be unique.`, {
        step: def.name,
      });
    }
    if (def.name in this.schema.shape) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Step "${def.name}" in workflow "${this.name}" has the same name as a state field; LangGraph needs them distinct. Rename the step (e.g. "${def.name}_step") or the field.`,
        { step: def.name },
      );
    }
    if (def.kind === "map" && !(def.map!.into in this.schema.shape)) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Fan-out step "${def.name}" gathers into "${def.map!.into}", which is not a field of the state schema.`,
        { step: def.name },
      );
    }
    return new Workflow<Schema, Names | N>(this.name, this.options, [...this.defs, def], this.routes);
  }

  /** Validate an input against the state schema; throws INVALID_INPUT listing the fields at fault. */
  parseInput(input: unknown): z.infer<Schema> {
    const fields = Object.keys(this.schema.shape);
    if (typeof input === "object" && input !== null && !Array.isArray(input)) {
      const unknown = Object.keys(input).filter((k) => !fields.includes(k));
      if (unknown.length) {
        // zod would drop them silently, and a misspelt field would quietly run with a default.
        const described = unknown.map((k) => {
          const near = closest(k, fields);
          return near ? `"${k}" (did you mean "${near}"?)` : `"${k}"`;
        });
        throw new CairnError(
          "INVALID_INPUT",
          `Input for workflow "${this.name}" has field(s) its state schema does not declare: ${described.join(", ")}. Fields: ${fields.join(", ")}.`,
          { fields: unknown },
        );
      }
    }
    const result = this.schema.safeParse(input ?? {});
    if (!result.success) {
      throw new CairnError(
        "INVALID_INPUT",
        `Input for workflow "${this.name}" does not match its state schema:\n${z.prettifyError(result.error)}`,
        { fields: result.error.issues.map((i) => i.path.join(".")) },
        { cause: result.error },
      );
    }
    const unstorable = findUnstorableField(result.data as Record<string, unknown>);
    if (unstorable) {
      throw new CairnError(
        "INVALID_INPUT",
        `Input for workflow "${this.name}" holds a value the store cannot keep exactly: ${unstorable.path} is ${unstorable.kind}. Instead, ${unstorable.instead}.`,
        { fields: [unstorable.path], path: unstorable.path, kind: unstorable.kind },
      );
    }
    return result.data;
  }

  /** The step a graph node belongs to (a fan-out's gather node belongs to the fan-out). */
  stepOfNode(node: string): string {
    for (const d of this.defs) if (d.kind === "map" && node === gatherNode(d.name)) return d.name;
    return node;
  }

  /** Whether a step is a fan-out (`.map`). */
  isMapStep(step: string): boolean {
    return this.defs.some((d) => d.name === step && d.kind === "map");
  }

  /** The node to attribute a restored state to so that routing continues at the step after `step`. */
  lastNodeOf(step: string): string {
    return this.isMapStep(step) ? gatherNode(step) : step;
  }

  /** Run one step on a state without a graph or a store: for trying a change before rerunning. */
  async runStepAlone(step: Names, state: z.infer<Schema>, ctx: Omit<StepContext, "step" | "attempt" | "resumed">): Promise<Partial<z.infer<Schema>>> {
    const def = this.defs.find((d) => d.name === step);
    if (!def) throw unknownStep(this.name, step, this.steps);
    const stepCtx = { ...ctx, step, attempt: 1, resumed: false };
    if (def.kind === "step") return this.checkUpdate(step, await def.fn!(state, stepCtx));
    const items = def.map!.over(state);
    const results = await Promise.all(
      items.map(async (item, index) => {
        const result = await def.map!.run(item, { ...stepCtx, index });
        checkStorable(`Item ${index} of step "${step}"`, step, findUnstorable(result, `${def.map!.into}[${index}]`));
        return result;
      }),
    );
    return { [def.map!.into]: results } as Partial<z.infer<Schema>>;
  }

  /**
   * Build the LangGraph `StateGraph` for one run. Every step is entered through a conditional route that
   * consults the state, and every step records in the state that it finished (and, the first time, the
   * values it replaced), so a restart from a named step works from the latest state alone.
   */
  toStateGraph(runtime: RunRuntime): StateGraph<any, any, any, any, any, any> {
    type S = z.infer<Schema>;
    const internal: Record<string, z.ZodType> = {
      [USAGE_CHANNEL]: z.any().register(registry, { reducer: { fn: (a: Usage | undefined, b: Usage | undefined) => addUsage(a, b) } }),
      [FINGERPRINT_CHANNEL]: z
        .record(z.string(), z.string())
        .register(registry, { reducer: { fn: (a: Record<string, string>, b: Record<string, string>) => ({ ...a, ...b }) }, default: () => ({}) }),
      [DONE_CHANNEL]: z
        .array(z.string())
        .register(registry, { reducer: { fn: (a: string[], b: string[]) => [...a, ...b.filter((x) => !a.includes(x))] }, default: () => [] }),
    };
    for (const d of this.defs) {
      internal[undoChannel(d.name)] = z.any().optional();
      if (d.kind === "map") {
        internal[mapChannel(d.name)] = z
          .array(z.any())
          .register(registry, { reducer: { fn: (a: unknown[], b: unknown[]) => a.concat(b) }, default: () => [] });
      }
    }
    const schema = this.schema.extend(internal);
    const graph = new StateGraph(schema) as unknown as StateGraph<any, any, any, any, any, any>;
    const names = this.defs.map((d) => d.name);
    const userView = (state: Record<string, unknown>): S => {
      const view: Record<string, unknown> = {};
      for (const k of Object.keys(this.schema.shape)) if (k in state) view[k] = state[k];
      return view as S;
    };
    const ctxFor = (step: string, config: RunnableConfig, attempt: number, item?: number): StepContext => {
      const taskId = taskIdOf(config);
      const where = item === undefined ? `Step "${step}"` : `Item ${item} of step "${step}"`;
      return {
        thread: String(config.configurable?.thread_id ?? runtime.thread),
        step,
        signal: runtime.signal,
        log: (message) => runtime.emit({ type: "log", thread: runtime.thread, step, item, message }),
        attempt,
        resumed: runtime.resumed,
        progress: (done, total, message) => runtime.emit({ type: "progress", thread: runtime.thread, step, item, done, total, message }),
        usage: (report) => runtime.recordUsage(taskId, usageFrom(report, runtime.pricing, where), step, item),
        artifacts: runtime.artifactsFor(where),
      };
    };
    /** What the task spent, as an update of the thread's running total. */
    const spent = (config: RunnableConfig): Record<string, Usage> => {
      const usage = runtime.usageOf(taskIdOf(config));
      return isEmptyUsage(usage) ? {} : { [USAGE_CHANNEL]: usage };
    };
    const policyOf = (def: StepDef<S>): TaskPolicy => ({ retry: def.retry, concurrency: def.map?.concurrency, saveEvery: def.map?.saveEvery });
    const stepHashes = new Map<string, string>();
    for (const d of this.defs) if (d.fingerprint !== undefined) stepHashes.set(d.name, hashOf(d.fingerprint));
    /**
     * The done mark, and on the first run the undo record, that go with a step's update; and the hash of
     * what the step declares it depends on, saved with its output so a resume can tell stale output.
     */
    const bookkeeping = (step: string, state: Record<string, unknown>, changed: string[]) => {
      const hash = stepHashes.get(step);
      const fp = hash === undefined ? {} : { [FINGERPRINT_CHANNEL]: { [step]: hash } };
      const done = (state[DONE_CHANNEL] as string[] | undefined) ?? [];
      if (done.includes(step)) return fp;
      const fields: Record<string, unknown> = {};
      const absent: string[] = [];
      for (const k of changed) {
        if (state[k] === undefined) absent.push(k);
        else fields[k] = state[k];
      }
      return { ...fp, [DONE_CHANNEL]: [step], [undoChannel(step)]: { fields, absent } satisfies UndoRecord };
    };

    for (const def of this.defs) {
      if (def.kind === "step") {
        graph.addNode(def.name, async (state: Record<string, unknown>, config: RunnableConfig) => {
          // Before any wait for a slot: LangGraph has already added this task's listener to the shared signal.
          markSharedSignal(config);
          return runtime.task(
            def.name,
            undefined,
            taskIdOf(config),
            async (attempt) => {
              const update = this.checkUpdate(def.name, await def.fn!(userView(state), ctxFor(def.name, config, attempt)));
              return { ...update, ...bookkeeping(def.name, state, Object.keys(update)), ...spent(config) };
            },
            policyOf(def),
          );
        });
      } else {
        const map = def.map!;
        graph.addNode(def.name, async (arg: { __cairn_item: unknown; __cairn_index: number }, config: RunnableConfig) => {
          markSharedSignal(config);
          return runtime.task(
            def.name,
            arg.__cairn_index,
            taskIdOf(config),
            async (attempt) => {
              const ctx: ItemContext = { ...ctxFor(def.name, config, attempt, arg.__cairn_index), index: arg.__cairn_index };
              const result = await map.run(arg.__cairn_item, ctx);
              checkStorable(`Item ${arg.__cairn_index} of step "${def.name}"`, def.name, findUnstorable(result, `${map.into}[${arg.__cairn_index}]`));
              return { [mapChannel(def.name)]: [{ i: arg.__cairn_index, r: result }], ...spent(config) };
            },
            policyOf(def),
          );
        });
        graph.addNode(gatherNode(def.name), async (state: Record<string, unknown>, config: RunnableConfig) =>
          runtime.task(gatherNode(def.name), undefined, taskIdOf(config), async () => {
            const parts = ((state[mapChannel(def.name)] as { i: number; r: unknown }[] | undefined) ?? []).slice();
            parts.sort((a, b) => a.i - b.i);
            return {
              [map.into]: parts.map((p) => p.r),
              [mapChannel(def.name)]: new Overwrite([]),
              ...bookkeeping(def.name, state, [map.into]),
            };
          }),
        );
      }
    }

    /**
     * Run a workflow's own routing code (`when`, `over`, a route). It runs between steps, outside any
     * step's task, so its failure would otherwise surface as a bare stack trace with no step named.
     */
    const userCode = <R>(step: string, what: string, fn: () => R): R => {
      try {
        return fn();
      } catch (error) {
        throw new CairnError(
          "STEP_FAILED",
          `its ${what}() function threw: ${error instanceof Error ? error.message : String(error)}`,
          { thread: runtime.thread, step, routing: true },
          { cause: error },
        );
      }
    };
    /** Where to go when entering `target`: its node, its fan-out, or (when skipped) on past it. */
    const enter = (target: string, state: S): string | Send[] => {
      let i = names.indexOf(target);
      while (i !== -1 && i < this.defs.length) {
        const def = this.defs[i]!;
        if (def.when && !userCode(def.name, "when", () => def.when!(state))) {
          // A skipped step goes on as if it had run and found nothing to do.
          const route = this.routes.get(def.name);
          if (route) return enter(userCode(def.name, "route", () => route.to(state)), state);
          i += 1;
          continue;
        }
        if (def.kind === "step") return def.name;
        const items = userCode(def.name, "over", () => def.map!.over(state));
        if (items.length === 0) return gatherNode(def.name);
        runtime.emit({ type: "fanout", thread: runtime.thread, step: def.name, total: items.length, done: 0 });
        return items.map((item, index) => new Send(def.name, { __cairn_item: item, __cairn_index: index }));
      }
      return END;
    };
    const after = (step: string) => (state: Record<string, unknown>) => {
      const s = userView(state);
      const route = this.routes.get(step);
      if (route) {
        const target = userCode(step, "route", () => route.to(s));
        if (target === END_OF_WORKFLOW || target === END) return END;
        if (!names.includes(target)) throw unknownStep(this.name, target, this.steps);
        return enter(target, s);
      }
      const i = names.indexOf(step);
      return i + 1 < names.length ? enter(names[i + 1]!, s) : END;
    };
    const destinations = [...this.defs.flatMap((d) => (d.kind === "map" ? [d.name, gatherNode(d.name)] : [d.name])), END];
    graph.addConditionalEdges(START, (state: Record<string, unknown>) => (names.length ? enter(names[0]!, userView(state)) : END), destinations);
    for (const def of this.defs) {
      if (def.kind === "map") graph.addEdge(def.name, gatherNode(def.name));
      graph.addConditionalEdges(this.lastNodeOf(def.name), after(def.name), destinations);
    }
    return graph;
  }

  private checkUpdate(step: string, update: unknown): Partial<z.infer<Schema>> {
    if (update === undefined || update === null) return {};
    if (typeof update !== "object" || Array.isArray(update)) {
      throw new CairnError("INVALID_ARGUMENT", `Step "${step}" returned ${Array.isArray(update) ? "an array" : typeof update}; a step returns an object of state fields to update.`, {
        step,
      });
    }
    const unknownKeys = Object.keys(update).filter((k) => !(k in this.schema.shape));
    if (unknownKeys.length) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Step "${step}" returned field(s) ${unknownKeys.map((k) => `"${k}"`).join(", ")} that the state schema of "${this.name}" does not declare. Add them to the schema or stop returning them.`,
        { step },
      );
    }
    const result = this.schema.partial().safeParse(update);
    if (!result.success) {
      throw new CairnError("INVALID_ARGUMENT", `Step "${step}" returned an update that does not match the state schema (output of the step):\n${z.prettifyError(result.error)}`, { step }, { cause: result.error });
    }
    checkStorable(`Step "${step}"`, step, findUnstorableField(update as Record<string, unknown>));
    return update as Partial<z.infer<Schema>>;
  }
}

/**
 * Start a workflow: a name and a zod state schema; add steps with `.step`, `.map` and `.route`.
 *
 * @example
 * ```ts
 * const State = z.object({ topic: z.string(), story: z.string().optional() });
 * export default workflow("story", { state: State, defaultInput: { topic: "honesty" } })
 *   .step("write", async (s) => ({ story: `A tale of ${s.topic}` }));
 * ```
 */
export function workflow<Schema extends AnyZodObject>(name: string, options: WorkflowOptions<Schema>): Workflow<Schema, never> {
  return new Workflow(name, options);
}

/** An array field that accumulates: each update is appended (the reducer LangGraph applies to it). */
export function appendList<T extends z.ZodType>(item: T) {
  return z
    .array(item)
    .default([])
    .register(registry, { reducer: { fn: (a: z.infer<T>[], b: z.infer<T>[] | z.infer<T>) => a.concat(b as z.infer<T>[]) }, default: () => [] as z.infer<T>[] });
}

/**
 * Refuse a step's output that the store would not give back as it is (see `findUnstorable`). Thrown
 * inside the step's task, so the step fails like any failing step and nothing of it is saved.
 */
function checkStorable(who: string, step: string, unstorable: UnstorableValue | undefined): void {
  if (!unstorable) return;
  throw new CairnError(
    "INVALID_STATE",
    `${who} returned a value the store cannot keep exactly: ${unstorable.path} is ${unstorable.kind}. Instead, ${unstorable.instead}. Nothing of the step was saved; fix it and resume the thread.`,
    { step, path: unstorable.path, kind: unstorable.kind },
  );
}

/** The names among `candidates` that appear quoted in `source`, in the order they first appear. */
function quotedNames(source: string, candidates: readonly string[]): string[] {
  const found: string[] = [];
  for (const m of source.matchAll(/(["'`])([A-Za-z][A-Za-z0-9_-]*)\1/g)) {
    const name = m[2]!;
    if (candidates.includes(name) && !found.includes(name)) found.push(name);
  }
  return found;
}

/** The candidate nearest to `word` by edit distance, if it is close enough to be a likely typo. */
function closest(word: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(word.length / 3)) + 1;
  for (const c of candidates) {
    const d = editDistance(word.toLowerCase(), c.toLowerCase());
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i += 1) {
    const cur = [i];
    for (let j = 1; j <= b.length; j += 1) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

export function unknownStep(workflowName: string, step: string, valid: readonly string[]): CairnError {
  return new CairnError(
    "UNKNOWN_STEP",
    `Unknown step "${step}" in workflow "${workflowName}". Valid steps: ${valid.join(", ")}.`,
    { step, valid: [...valid] },
  );
}

/** The id LangGraph gives the running task (the key its writes are saved under). */
export function taskIdOf(config: RunnableConfig | undefined): string | undefined {
  const id = config?.configurable?.["__pregel_task_id"];
  return typeof id === "string" ? id : undefined;
}

export function isWorkflow(value: unknown): value is Workflow<AnyZodObject, string> {
  return typeof value === "object" && value !== null && (value as { kind?: unknown }).kind === "cairn.workflow";
}
