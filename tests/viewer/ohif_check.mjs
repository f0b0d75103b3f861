// Opens DICOM SEGs in OHIF Viewer 3.13 (puppeteer-core + Debian chromium) and reports what
// it saw. Usage: node ohif_check.mjs JOB.json  (JOB written by tests/viewer/stack.py).
//
// For every target it opens
//   /viewer?StudyInstanceUIDs=<study>&initialSeriesInstanceUID=<SEG series>
// waits until OHIF has hydrated the SEG onto its source series (a segmentation with segments
// in OHIF's segmentationService *and* a labelmap representation on a viewport, plus the
// segment label in the page), optionally pages the viewport to a world point, and saves two
// screenshots: segmentation shown, then hidden. The Python test diffs them to find the
// overlay pixels, and maps those pixels back to patient space with the canvas->world samples
// reported here. The report goes to OUT/report.json and stdout.
import { createRequire } from 'node:module';
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';

const job = JSON.parse(readFileSync(process.argv[2], 'utf8'));
// puppeteer-core lives in a cache folder, not in the repository: ESM ignores NODE_PATH, so
// resolve it from there explicitly (its CommonJS build).
const require = createRequire(path.join(job.puppeteerDir, 'package.json'));
const puppeteer = require('puppeteer-core');

const WIDTH = 1400;
const HEIGHT = 1000;
const LOAD_TIMEOUT_MS = 150_000;
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// Console lines that are expected in this setup and say nothing about our SEGs.
const BENIGN = [
  /favicon/i,
  /Download the React DevTools/i,
  /\[HMR\]/,
  /manifest/i,
];

async function waitFor(page, fn, arg, timeoutMs, what) {
  const start = Date.now();
  let last;
  while (Date.now() - start < timeoutMs) {
    last = await page.evaluate(fn, arg).catch(e => ({ ok: false, error: String(e) }));
    if (last && last.ok) {
      return { ...last, waitedMs: Date.now() - start };
    }
    await sleep(500);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}: ${JSON.stringify(last)}`);
}

// ---- functions evaluated in the page ------------------------------------------------------

// The SEG is loaded when OHIF's segmentationService has a segmentation with segments, some
// viewport shows it as a representation, and the viewport has an image.
function segState({ expectedLabels, inPage }) {
  const services = window.services;
  if (!services?.segmentationService || !window.cornerstone) {
    return { ok: false, stage: 'services not ready' };
  }
  const { segmentationService, viewportGridService, displaySetService } = services;
  const segmentations = segmentationService.getSegmentations() || [];
  const gridState = viewportGridService.getState();
  const viewportIds = [...(gridState.viewports?.keys?.() ?? [])];
  const representations = [];
  for (const viewportId of viewportIds) {
    for (const rep of segmentationService.getSegmentationRepresentations(viewportId) || []) {
      representations.push({
        viewportId,
        segmentationId: rep.segmentationId,
        type: rep.type,
        visible: rep.visible,
        active: rep.active,
      });
    }
  }
  const segs = segmentations.map(s => {
    const rep = representations.find(r => r.segmentationId === s.segmentationId);
    return {
      segmentationId: s.segmentationId,
      label: s.label,
      segments: Object.values(s.segments || {})
        .filter(Boolean)
        .map(seg => ({
          segmentIndex: seg.segmentIndex,
          label: seg.label,
          // The colour OHIF draws with (from the SEG's Recommended Display CIELab Value).
          color: rep ? segmentationService.getSegmentColor(rep.viewportId, s.segmentationId, seg.segmentIndex) : null,
        })),
    };
  });
  // Which series each viewport shows: the SEG must be drawn on its source series.
  const viewportSeries = {};
  for (const viewportId of viewportIds) {
    const uids = gridState.viewports.get(viewportId)?.displaySetInstanceUIDs || [];
    viewportSeries[viewportId] = uids.map(uid => displaySetService.getDisplaySetByUID(uid)?.SeriesInstanceUID);
  }
  const labels = segs.flatMap(s => s.segments.map(seg => seg.label));
  const text = document.body.innerText || '';
  const labelsInPage = expectedLabels.filter(l => text.includes(l));
  const displaySets = displaySetService.getActiveDisplaySets().map(ds => ({
    modality: ds.Modality,
    seriesInstanceUID: ds.SeriesInstanceUID,
    description: ds.SeriesDescription,
    isHydrated: ds.isHydrated ?? null,
    isLoaded: ds.isLoaded ?? null,
  }));
  const shown = representations.filter(r => segmentations.some(s => s.segmentationId === r.segmentationId));
  const loaded = segs.some(s => s.segments.length > 0) && shown.length > 0;
  const ok = loaded && expectedLabels.every(l => labels.includes(l)) && (!inPage || labelsInPage.length === expectedLabels.length);
  return {
    ok,
    stage: ok ? 'segmentation shown' : loaded ? 'waiting for the segment labels' : 'waiting for the segmentation',
    segmentations: segs,
    representations,
    labels,
    labelsInPage,
    displaySets,
    viewportIds,
    viewportSeries,
    activeViewportId: gridState.activeViewportId,
  };
}

function openSegmentationPanel() {
  window.services.panelService.activatePanel('@ohif/extension-cornerstone.panelModule.panelSegmentation', true);
  return { ok: true };
}

// Pages the viewport to the slice nearest a world point (stack: image index; volume: camera).
async function jumpTo({ viewportId, point }) {
  const cs = window.cornerstone;
  const engines = cs.getRenderingEngines();
  let viewport = null;
  for (const engine of engines) {
    viewport = engine.getViewport(viewportId) || viewport;
  }
  if (!viewport) {
    return { ok: false, error: `no viewport ${viewportId}` };
  }
  if (typeof viewport.getImageIds === 'function' && typeof viewport.setImageIdIndex === 'function') {
    const index = cs.utilities.getClosestStackImageIndexForPoint(point, viewport);
    if (index === null || index === undefined) {
      return { ok: false, error: 'point is on no slice of the stack' };
    }
    await viewport.setImageIdIndex(index);
    viewport.render();
    return { ok: true, kind: 'stack', index };
  }
  if (typeof viewport.jumpToWorld === 'function') {
    viewport.jumpToWorld(point);
    viewport.render();
    return { ok: true, kind: 'volume' };
  }
  // Volume viewport without jumpToWorld: move the focal plane along the view normal.
  const camera = viewport.getCamera();
  const n = camera.viewPlaneNormal;
  const d = (point[0] - camera.focalPoint[0]) * n[0] + (point[1] - camera.focalPoint[1]) * n[1] + (point[2] - camera.focalPoint[2]) * n[2];
  const shift = n.map(v => v * d);
  viewport.setCamera({
    focalPoint: camera.focalPoint.map((v, i) => v + shift[i]),
    position: camera.position.map((v, i) => v + shift[i]),
  });
  viewport.render();
  return { ok: true, kind: 'volume-camera' };
}

// Everything needed to map screenshot pixels to patient space and back.
function viewportGeometry({ viewportId, point }) {
  const cs = window.cornerstone;
  let viewport = null;
  for (const engine of cs.getRenderingEngines()) {
    viewport = engine.getViewport(viewportId) || viewport;
  }
  if (!viewport) {
    return { ok: false, error: `no viewport ${viewportId}` };
  }
  const canvas = viewport.canvas;
  const rect = canvas.getBoundingClientRect();
  const element = viewport.element.getBoundingClientRect();
  const camera = viewport.getCamera();
  const info = {
    ok: true,
    viewportType: viewport.type,
    className: viewport.constructor?.name,
    canvasRect: { left: rect.left, top: rect.top, width: rect.width, height: rect.height },
    elementRect: { left: element.left, top: element.top, width: element.width, height: element.height },
    devicePixelRatio: window.devicePixelRatio,
    // canvasToWorld takes CSS pixels relative to the canvas.
    canvasToWorld: {
      origin: viewport.canvasToWorld([0, 0]),
      x100: viewport.canvasToWorld([100, 0]),
      y100: viewport.canvasToWorld([0, 100]),
    },
    viewPlaneNormal: camera.viewPlaneNormal,
    focalPoint: camera.focalPoint,
    imageIndex: typeof viewport.getCurrentImageIdIndex === 'function' ? viewport.getCurrentImageIdIndex() : null,
    numberOfImages: typeof viewport.getImageIds === 'function' ? viewport.getImageIds().length : null,
    renderer: null,
  };
  if (point) {
    info.pointCanvas = viewport.worldToCanvas(point);
  }
  try {
    const gl = document.createElement('canvas').getContext('webgl2');
    const ext = gl && gl.getExtension('WEBGL_debug_renderer_info');
    info.renderer = ext ? gl.getParameter(ext.UNMASKED_RENDERER_WEBGL) : gl ? 'webgl2 (unnamed)' : 'no webgl2';
  } catch (e) {
    info.renderer = `error: ${e}`;
  }
  info.cpuRendering = cs.getShouldUseCPURendering ? cs.getShouldUseCPURendering() : null;
  return info;
}

// OHIF 3.13 sometimes restores a stale view presentation while it swaps the SEG viewport for
// the source series (a race): the image then comes up rotated by 90 degrees. Record it, then
// do what a radiologist would do, "Reset View", so the screenshots show the acquisition plane
// as acquired. The test reports the rotation as a warning.
function viewState({ viewportId, reset }) {
  let viewport = null;
  for (const engine of window.cornerstone.getRenderingEngines()) {
    viewport = engine.getViewport(viewportId) || viewport;
  }
  if (!viewport) {
    return { ok: false, error: `no viewport ${viewportId}` };
  }
  const presentation = viewport.getViewPresentation();
  const state = {
    ok: true,
    rotation: presentation.rotation ?? 0,
    flipHorizontal: !!presentation.flipHorizontal,
    flipVertical: !!presentation.flipVertical,
    viewUp: viewport.getCamera().viewUp,
  };
  const turned = Math.abs(((state.rotation % 360) + 360) % 360) > 0.5;
  if (reset && (turned || state.flipHorizontal || state.flipVertical)) {
    viewport.resetCamera();
    viewport.render();
    state.reset = true;
  }
  return state;
}

function setSegVisibility({ viewportId, segmentationIds, visible }) {
  const { segmentationService } = window.services;
  for (const segmentationId of segmentationIds) {
    const segmentation = segmentationService.getSegmentation(segmentationId);
    for (const segment of Object.values(segmentation?.segments || {})) {
      if (segment) {
        segmentationService.setSegmentVisibility(viewportId, segmentationId, segment.segmentIndex, visible);
      }
    }
  }
  let viewport = null;
  for (const engine of window.cornerstone.getRenderingEngines()) {
    viewport = engine.getViewport(viewportId) || viewport;
  }
  viewport?.render();
  return { ok: true };
}

function overlays() {
  const text = document.body.innerText || '';
  return {
    tourShown: !!document.querySelector('.shepherd-element'),
    investigationalBanner: /for investigational use only/i.test(text),
    modalOpen: !!document.querySelector('[role="dialog"]'),
    modalText: [...document.querySelectorAll('[role="dialog"]')].map(d => d.innerText.slice(0, 300)),
    imageLoadErrors: window.__msfnImageLoadErrors || [],
    viewportNotifications: [...document.querySelectorAll('[data-cy="viewport-notification"]')].map(d => d.innerText.slice(0, 300)),
  };
}

// Waits for two animation frames so a render request has reached the canvas.
function frames() {
  return new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(() => resolve({ ok: true }))));
}

// A screenshot of a settled page: under CPU load a render (the reset view, the jump to the
// focus slice, a late image decode) can land between the "shown" and "hidden" screenshots, and
// the diff then reads the change of slice or camera as overlay pixels. So shoot until two
// shots a moment apart are identical, and say whether they ever were.
async function settledScreenshot(page, file, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  await page.evaluate(frames);
  let previous = await page.screenshot();
  let shots = 1;
  for (;;) {
    await sleep(400);
    await page.evaluate(frames);
    const current = await page.screenshot();
    shots += 1;
    if (current.equals(previous) || Date.now() > deadline) {
      writeFileSync(file, current);
      return { settled: current.equals(previous), shots };
    }
    previous = current;
  }
}

// ---- one target ---------------------------------------------------------------------------

async function check(browser, target) {
  const started = Date.now();
  const page = await browser.newPage();
  await page.setViewport({ width: WIDTH, height: HEIGHT, deviceScaleFactor: 1 });
  const consoleLines = [];
  const pageErrors = [];
  const failedRequests = [];
  page.on('console', msg => {
    const type = msg.type();
    if (type === 'error' || type === 'warn' || type === 'warning') {
      const text = msg.text();
      if (!BENIGN.some(re => re.test(text))) {
        const where = msg.stackTrace()?.[0];
        consoleLines.push({
          type,
          text: text.slice(0, 1000),
          atMs: Date.now() - started,
          source: where ? `${where.url?.split('/').pop()}:${where.lineNumber}` : null,
        });
      }
    }
  });
  page.on('pageerror', err => pageErrors.push(String(err?.stack || err).slice(0, 2000)));
  page.on('requestfailed', req => {
    failedRequests.push({ url: req.url(), error: req.failure()?.errorText });
  });
  page.on('response', res => {
    if (res.status() >= 400) {
      failedRequests.push({ url: res.url(), status: res.status() });
    }
  });

  const url =
    `${job.baseUrl}/viewer?StudyInstanceUIDs=${encodeURIComponent(target.studyInstanceUID)}` +
    `&initialSeriesInstanceUID=${encodeURIComponent(target.segSeriesInstanceUID)}`;
  const result = { name: target.name, url, ok: false };
  try {
    await page.goto(url, { waitUntil: 'domcontentloaded', timeout: 60_000 });
    await waitFor(page, segState, { expectedLabels: target.expectedLabels, inPage: false }, LOAD_TIMEOUT_MS, 'the SEG to be hydrated');
    result.hydratedMs = Date.now() - started;
    // The longitudinal mode starts with the right-hand panels closed; open the segmentation
    // panel so the segment labels are in the page (and in the screenshot).
    await page.evaluate(openSegmentationPanel);
    const state = await waitFor(page, segState, { expectedLabels: target.expectedLabels, inPage: true }, 30_000, 'the segment labels in the page');
    Object.assign(result, { state, loadMs: Date.now() - started });
    const rep = state.representations.find(r => state.segmentations.some(s => s.segmentationId === r.segmentationId));
    const viewportId = rep.viewportId;
    result.viewportId = viewportId;
    // Let the viewport settle (image decode, labelmap upload to the GPU) before paging.
    await sleep(1000);
    result.initialView = await page.evaluate(viewState, { viewportId, reset: true });
    if (target.worldPoint) {
      result.jump = await page.evaluate(jumpTo, { viewportId, point: target.worldPoint });
      await sleep(750);
    }
    await page.evaluate(frames);
    result.overlays = await page.evaluate(overlays);
    result.geometry = await page.evaluate(viewportGeometry, { viewportId, point: target.worldPoint });
    const shownPath = path.join(job.outDir, `${target.name}-shown.png`);
    const hiddenPath = path.join(job.outDir, `${target.name}-hidden.png`);
    const shownShot = await settledScreenshot(page, shownPath);
    const segmentationIds = state.segmentations.map(s => s.segmentationId);
    await page.evaluate(setSegVisibility, { viewportId, segmentationIds, visible: false });
    await sleep(500);
    const hiddenShot = await settledScreenshot(page, hiddenPath);
    result.settled = { shown: shownShot, hidden: hiddenShot };
    await page.evaluate(setSegVisibility, { viewportId, segmentationIds, visible: true });
    // The geometry must not have moved between the two screenshots (else the diff lies).
    result.geometryAfter = await page.evaluate(viewportGeometry, { viewportId, point: target.worldPoint });
    result.screenshots = { shown: shownPath, hidden: hiddenPath };
    result.ok = true;
  } catch (err) {
    result.error = String(err?.stack || err);
    try {
      result.overlays = await page.evaluate(overlays);
      result.lastState = await page.evaluate(segState, { expectedLabels: target.expectedLabels, inPage: true });
      const failPath = path.join(job.outDir, `${target.name}-failed.png`);
      await page.screenshot({ path: failPath });
      result.screenshots = { failed: failPath };
    } catch (inner) {
      result.diagnosticsError = String(inner);
    }
  }
  result.console = consoleLines;
  result.pageErrors = pageErrors;
  result.failedRequests = failedRequests;
  result.totalMs = Date.now() - started;
  await page.close();
  return result;
}

// ---- main ---------------------------------------------------------------------------------

const browser = await puppeteer.launch({
  executablePath: job.chromium,
  headless: true,
  // Software WebGL (SwiftShader through ANGLE): CI machines have no GPU, and cornerstone3D
  // renders with WebGL2; --enable-unsafe-swiftshader is needed since Chromium 137 dropped
  // the automatic SwiftShader fallback.
  args: [
    '--headless=new',
    '--no-sandbox',
    '--use-angle=swiftshader',
    '--enable-unsafe-swiftshader',
    `--window-size=${WIDTH},${HEIGHT}`,
    '--disable-dev-shm-usage',
    '--no-first-run',
    '--no-default-browser-check',
  ],
  protocolTimeout: 180_000,
});
const report = { browserVersion: await browser.version(), results: [] };
try {
  for (const target of job.targets) {
    report.results.push(await check(browser, target));
  }
} finally {
  await browser.close();
}
const text = JSON.stringify(report, null, 2);
writeFileSync(path.join(job.outDir, 'report.json'), text);
process.stdout.write(text + '\n');
