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
});
