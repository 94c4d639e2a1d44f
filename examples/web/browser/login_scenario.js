// A person logs in to an example app through the sandbox, in headless
// Chromium: sign in as alice, log out, sign in again, replay the callback
// URL, deny, and link a second provider's identity. A screenshot of every
// step goes to ARTIFACT_DIR; what each step showed is printed as one JSON
// line for tests/e2e/web_apps.rs to check. Any missing element fails the run.
//
// Environment: APP_URL (the app's origin), ARTIFACT_DIR, CHROMIUM (default
// /usr/bin/chromium: Debian's package, as no browser can be downloaded).

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { chromium } = require('playwright-core');

const APP_URL = process.env.APP_URL.replace(/\/+$/, '');
const ARTIFACT_DIR = process.env.ARTIFACT_DIR;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const onApp = (url) => url.href.startsWith(`${APP_URL}/`);

async function main() {
  fs.mkdirSync(ARTIFACT_DIR, { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'authbroker-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: 900, height: 720 },
  });
  const seen = { screenshots: [], problems: [] };
  const page = context.pages()[0] ?? (await context.newPage());
  const shot = async (step) => {
    const file = path.join(ARTIFACT_DIR, `${String(seen.screenshots.length + 1).padStart(2, '0')}-${step}.png`);
    await page.screenshot({ path: file, fullPage: true });
    seen.screenshots.push(file);
  };
  try {
    page.setDefaultTimeout(15_000);
    // What would make a page look wrong: a script error, a refused (CSP)
    // or failed load, a stylesheet or image that did not arrive. Error
    // pages themselves answer 4xx by design, and nobody serves a favicon.
    page.on('console', (m) => {
      if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) {
        seen.problems.push(`console: ${m.text()}`);
      }
    });
    page.on('pageerror', (e) => seen.problems.push(`page error: ${e.message}`));
    page.on('requestfailed', (r) => seen.problems.push(`request failed: ${r.url()}`));
    page.on('response', (r) => {
      const request = r.request();
      if (r.status() >= 400 && !request.isNavigationRequest() && !r.url().endsWith('/favicon.ico')) {
        seen.problems.push(`${r.status()} for ${r.url()}`);
      }
    });
    const callbacks = [];
    page.on('request', (r) => {
      if (r.isNavigationRequest() && r.url().startsWith(`${APP_URL}/callback?`)) callbacks.push(r.url());
    });

    const text = async (selector) => (await page.locator(selector).innerText()).trim();
    const clickLogin = async (provider) => {
      await page.getByRole('button', { name: new RegExp(`^Log in with ${provider}$`, 'i') }).click();
      await page.waitForURL((url) => !onApp(url));
      await page.waitForLoadState('load');
    };
    const pickerLooksRight = async () => ({
      heading: await text('h1'),
      users: await page.locator('a.user').allInnerTexts(),
      avatarsLoaded: await page.$$eval('img', (imgs) => imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0)),
      hasDeny: (await page.getByRole('link', { name: 'Deny' }).count()) === 1,
    });
    const pick = async (user) => {
      await page.getByRole('link', { name: user, exact: true }).click();
      await page.waitForURL((url) => onApp(url) && !url.pathname.startsWith('/callback'));
    };
    const signedIn = async () => ({
      userId: await text('#user-id'),
      name: await text('#display-name'),
      outcome: await page.locator('#outcome').getAttribute('data-outcome'),
    });
    const errorPage = async () => ({
      heading: await text('h1'),
      reason: await text('#error-reason'),
      message: await text('#error-message'),
    });
    const logOut = async () => {
      await page.getByRole('button', { name: 'Log out' }).click();
      await page.waitForURL(`${APP_URL}/`);
    };

    await page.goto(`${APP_URL}/`);
    seen.home = await text('h1');
    await shot('home');

    await clickLogin('sandbox');
    seen.picker = await pickerLooksRight();
    await shot('sandbox-picker');
    await pick('alice');
    seen.first = await signedIn();
    seen.firstCallback = callbacks.length;
    await shot('signed-in');

    await logOut();
    seen.afterLogout = await text('h1');
    await shot('logged-out');

    await clickLogin('sandbox');
    await pick('alice');
    seen.second = await signedIn();
    await shot('signed-in-again');

    await page.goto(callbacks[0]);
    seen.replay = await errorPage();
    await shot('replayed-callback');

    await page.goto(`${APP_URL}/`);
    await logOut();
    await clickLogin('sandbox');
    await page.getByRole('link', { name: 'Deny' }).click();
    await page.waitForURL((url) => onApp(url));
    seen.denied = await errorPage();
    await shot('denied');

    // sandbox_link's policy is link_required: signed in as alice through
    // sandbox, her sandbox_link identity is linked to the same account.
    await page.goto(`${APP_URL}/`);
    await clickLogin('sandbox');
    await pick('alice');
    await clickLogin('sandbox_link');
    await pick('alice');
    await page.waitForURL(`${APP_URL}/link`);
    seen.linkPage = await text('h1');
    await shot('link-required');
    await page.getByRole('button', { name: /^Link to my account/ }).click();
    await page.waitForURL(`${APP_URL}/`);
    seen.linked = await signedIn();
    await shot('linked');
  } catch (e) {
    await shot('failed').catch(() => {});
    throw e;
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(seen));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
