// The API key prompt shared by the search page and the duplicates page (plain JavaScript, no build step): the key
// lives in sessionStorage and goes out as X-API-Key; a 401 asks for it in the page's <dialog id="key-dialog">.
'use strict';

window.clipsearchApiKey = (els, state, storageKey) => ({
  headers() { return state.apiKey ? { 'X-API-Key': state.apiKey } : {}; },

  // Resolves true when a key was entered (then remembered for the session), false when the dialog was dismissed.
  // Concurrent 401s share one prompt.
  ask(message) {
    if (!state.keyPrompt) {
      state.keyPrompt = new Promise((resolve) => {
        els.keyMessage.textContent = message;
        els.keyInput.value = '';
        const onClose = () => {
          els.keyDialog.removeEventListener('close', onClose);
          state.keyPrompt = null;
          const key = els.keyDialog.returnValue === 'ok' ? els.keyInput.value.trim() : '';
          if (key) {
            state.apiKey = key;
            sessionStorage.setItem(storageKey, key);
          }
          resolve(Boolean(key));
        };
        els.keyDialog.addEventListener('close', onClose);
        els.keyDialog.returnValue = '';
        els.keyDialog.showModal();
        els.keyInput.focus();
      });
    }
    return state.keyPrompt;
  },

  // fetch() with the key. On 401 it asks for the key (again, after a wrong one) until it is accepted or the user
  // cancels; any other failure throws an Error carrying the API's message (`detail — hint`) and the `status`.
  async request(path, options = {}) {
    for (;;) {
      const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...this.headers() } });
      if (response.status === 401) {
        const message = state.apiKey ? 'That API key was not accepted. Enter the key again.'
          : 'This server requires an API key.';
        if (state.apiKey) sessionStorage.removeItem(storageKey);
        if (await this.ask(message)) continue;
        throw Object.assign(new Error('This server needs an API key: search again to enter it.'), { status: 401 });
      }
      if (!response.ok) {
        let message = `${response.status} ${response.statusText}`;
        try {
          const body = await response.json();
          if (typeof body.detail === 'string') message = body.detail + (body.hint ? ` — ${body.hint}` : '');
          else if (Array.isArray(body.detail)) message = body.detail.map((d) => d.msg).join('; ');
        } catch (_) { /* not JSON */ }
        throw Object.assign(new Error(message), { status: response.status });
      }
      return response;
    }
  },
});
