import { describe, expect, expectTypeOf, it } from "vitest";
import { z } from "zod";
import { open, resume, workflow, type RunResult, type StepName, type ThreadHandle } from "cairn";

/*
 * Step names are literal types: a workflow's type parameter collects every name passed to `.step`, so
 * `fromStep`, routes and the notebook handle accept only declared names.
 *
 * Vitest does not typecheck. The real assertions are the `@ts-expect-error` lines below, checked by
 * `npx tsc -p tsconfig.json` (which includes test/ and runs in CI): if a line stops being an error, tsc
 * fails with "Unused '@ts-expect-error' directive". The `expectTypeOf` calls are checked by tsc the same
 * way and also run (as no-ops) under vitest.
 */

const state = z.object({
  topic: z.string(),
  count: z.number().default(1),
  story: z.string().optional(),
});

const wf = workflow("w", { state })
  .step("a", async (s) => ({ story: `about ${s.topic}` }))
  .step("b", async (s) => ({ count: s.count + 1 }));

/** Never called: what is in here is only typechecked, so nothing runs and no store is touched. */
async function compileTimeOnly(): Promise<void> {
  await resume(wf, { thread: "t", fromStep: "a" });
  await resume(wf, { thread: "t", fromStep: "b", store: "file:.cairn" });
  // @ts-expect-error "nope" is not a step of wf
  await resume(wf, { thread: "t", fromStep: "nope" });
  // @ts-expect-error a step name is case-sensitive
  await resume(wf, { thread: "t", fromStep: "A" });

  wf.route("a", () => "b");
  wf.route("b", () => "end");
  // @ts-expect-error "zzz" is not a step to route from
  wf.route("zzz", () => "b");
  // @ts-expect-error a route may only lead to a declared step (or "end")
  wf.route("a", () => "nowhere");

  const handle = await open(wf, { thread: "t" });
  await handle.stateBefore("a");
  await handle.tryStep("b");
  await handle.continueFrom("b");
  // @ts-expect-error "nope" is not a step of wf
  await handle.stateBefore("nope");
  // @ts-expect-error "nope" is not a step of wf
  await handle.stateAfter("nope");
  // @ts-expect-error "nope" is not a step of wf
  await handle.tryStep("nope");
  // @ts-expect-error "nope" is not a step of wf
  await handle.continueFrom("nope");
  await handle.close();

  workflow("w2", { state }).step("x", async (s) => {
    expectTypeOf(s).toEqualTypeOf<{ topic: string; count: number; story?: string | undefined }>();
    // @ts-expect-error the state has no field "nope"
    void s.nope;
    return {};
  });
  // An update with no field of the state is a type error. (An unknown key next to a real field is not:
  // TypeScript's excess-property check does not reach there; the run's schema check rejects it instead.)
  // @ts-expect-error an update with no field of the state
  workflow("w3", { state }).step("x", async () => ({ nope: 1 }));
  // @ts-expect-error a field of the state keeps its type in an update
  workflow("w4", { state }).step("x", async () => ({ count: "one" }));
}

describe("step names are literal types", () => {
  it("collects the declared names in wf.steps", () => {
    expectTypeOf(wf.steps).toEqualTypeOf<("a" | "b")[]>();
    expectTypeOf<StepName<typeof wf>>().toEqualTypeOf<"a" | "b">();
    // Runtime agrees with the type.
    expect(wf.steps).toEqual(["a", "b"]);
  });

  it("types resume's fromStep with the step names", () => {
    expectTypeOf(resume<typeof wf>).parameter(1).toHaveProperty("fromStep").toEqualTypeOf<"a" | "b" | undefined>();
    expectTypeOf(resume<typeof wf>).returns.resolves.toEqualTypeOf<RunResult<z.infer<typeof state>>>();
  });

  it("types routes with the step names", () => {
    expectTypeOf(wf.route).parameter(0).toEqualTypeOf<"a" | "b">();
    expectTypeOf(wf.route("a", () => "b").steps).toEqualTypeOf<("a" | "b")[]>();
  });

  it("types the notebook handle with the step names and the zod state", () => {
    type Handle = ThreadHandle<typeof wf>;
    expectTypeOf<Handle["stateBefore"]>().parameter(0).toEqualTypeOf<"a" | "b">();
    expectTypeOf<Handle["stateBefore"]>().returns.resolves.toEqualTypeOf<z.infer<typeof state>>();
    expectTypeOf<Handle["tryStep"]>().returns.resolves.toEqualTypeOf<Partial<z.infer<typeof state>>>();
    expectTypeOf(open<typeof wf>).returns.resolves.toEqualTypeOf<Handle>();
  });

  it("gives a step the zod-inferred state", () => {
    type Fn = Parameters<typeof wf.step>[1];
    expectTypeOf<Fn>().parameter(0).toEqualTypeOf<z.infer<typeof state>>();
    expectTypeOf<z.infer<typeof state>>().toEqualTypeOf<{ topic: string; count: number; story?: string | undefined }>();
  });

  it("keeps the compile-time checks out of the run", () => {
    // Referenced so the checks above are not unused code; never called.
    expect(typeof compileTimeOnly).toBe("function");
  });
});
