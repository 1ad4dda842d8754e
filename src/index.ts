// Authoring
export { workflow, appendList, Workflow, END_OF_WORKFLOW } from "./workflow/builder.ts";
export type { StepContext, ItemContext, StepFn, StepLogger, MapOptions, StepOptions, WorkflowOptions, StepArtifacts, WorkflowShape, StepShape, RouteShape } from "./workflow/builder.ts";
export { TransientError, isTransientError } from "./workflow/instrument.ts";
export type { RunEvent, RetryPolicy, StopReason } from "./workflow/instrument.ts";
export { NO_USAGE, addUsage, isEmptyUsage, formatUsd } from "./workflow/usage.ts";
export type { Usage, Pricing, UsageReport } from "./workflow/usage.ts";

// Artifacts and sinks
export { artifactRef, isArtifactRef, findArtifactRefs, extensionFor } from "./store/artifacts.ts";
export { listArtifacts } from "./inspect/artifacts.ts";
export type { ListedArtifact } from "./inspect/artifacts.ts";
export type { ArtifactRef, ArtifactStore, PutArtifactOptions, StoredArtifact } from "./store/artifacts.ts";
export { JsonlSink } from "./sinks/jsonl.ts";
export type { JsonlSinkOptions } from "./sinks/jsonl.ts";

// Running
export { run, resume } from "./run/run.ts";
export type { RunResult, RunUsage, StartOptions, ResumeOptions, RunCommonOptions, StepName, StateOf } from "./run/run.ts";
export { previewResume } from "./run/preview.ts";
export type { ResumePlan, ResumePlanStep } from "./run/preview.ts";
export { open } from "./run/notebook.ts";
export type { ThreadHandle } from "./run/notebook.ts";
export { loadGraph } from "./run/load.ts";
export { readInputFile } from "./run/input.ts";
export type { RunTarget } from "./run/prepare.ts";
export { workflowDiagram, threadSteps, graphSteps } from "./run/diagram.ts";
export type { StepStatus, StepOnThread, ThreadSteps } from "./run/diagram.ts";
export type { CairnMetadata } from "./run/recording.ts";

// Retention and cleanup
export { prune, removeThread, gcArtifacts, checkpointsToPrune, parseAge, DEFAULT_ARTIFACT_GRACE_MS } from "./run/prune.ts";
export type { PruneOptions, PruneReport, PrunedThread, RemoveThreadOptions, RemovedThread, GcArtifactsOptions, ArtifactGcReport, CleanupReport, StoreChoice } from "./run/prune.ts";

// Reading
export { latestTuple, readHistory, savedWork, statusOf, spentInAll } from "./inspect/history.ts";
export type { HistoryEntry, SavedWork, ThreadStatus, ThreadSummary } from "./inspect/history.ts";
export { stateAt, listThreads } from "./inspect/state.ts";
export type { StateAt } from "./inspect/state.ts";
export { verifyStore } from "./inspect/verify.ts";
export type { VerifyReport, VerifyProblem } from "./inspect/verify.ts";
export { diffStates, diffCheckpoints, parseStateRef } from "./inspect/diff.ts";
export type { StateChange, StateDiff, StateRef, PathSegment } from "./inspect/diff.ts";

// Moving threads between stores
export { exportThread, writeThreadExport, EXPORT_INLINE_LIMIT } from "./inspect/export.ts";
export type { ExportOptions, ExportSource, ExportSummary } from "./inspect/export.ts";
export { importThread } from "./store/import.ts";
export type { ImportOptions, ImportSummary, ImportTarget } from "./store/import.ts";
export { readThreadExport, THREAD_DOCUMENT_FORMAT, THREAD_DOCUMENT_VERSION } from "./store/thread-document.ts";
export type { ThreadExport, ThreadDocument, ExportedCheckpoint, ExportedWrite, ExportedArtifact, TypedValue } from "./store/thread-document.ts";

// Stores
export { FileCheckpointSaver, FILE_STORE_FORMAT_VERSION } from "./store/file.ts";
export type { FileCheckpointSaverOptions, DeletedCheckpoints, JournalDamage, DamagedCheckpoint, ThreadVerification } from "./store/file.ts";
export { openStore, DEFAULT_STORE_URI } from "./store/open.ts";
export type { OpenedStore, StoreKind } from "./store/open.ts";
export type { LockHolder } from "./store/lease.ts";

// Errors
export { CairnError, isCairnError, USAGE_ERROR_CODES } from "./errors.ts";
export type { CairnErrorCode, CairnErrorDetails } from "./errors.ts";
