// vpanel's page behaviour, on top of Bootstrap's bundle. Everything here is a
// convenience: the forms post and the server checks them without it.
(function () {
  "use strict";

  document.addEventListener("DOMContentLoaded", function () {
    // A dialog whose form came back with errors opens again, showing them.
    var invalid = document.querySelector(".modal .is-invalid, .modal .alert-danger");
    if (invalid && window.bootstrap) {
      window.bootstrap.Modal.getOrCreateInstance(invalid.closest(".modal")).show();
    }

    // Reinstall and delete: the button waits until the vserver's name is typed.
    document.querySelectorAll("[data-confirm-name]").forEach(function (button) {
      var input = button.form.querySelector("input[name='confirm']");
      if (!input) {
        return;
      }
      var check = function () {
        button.disabled = input.value.trim() !== button.getAttribute("data-confirm-name");
      };
      input.addEventListener("input", check);
      check();
    });

    // A dialog that is closed forgets what was typed or ticked in it ("force", a name).
    document.querySelectorAll(".modal").forEach(function (modal) {
      modal.addEventListener("hidden.bs.modal", function () {
        var form = modal.querySelector("form");
        if (form) {
          form.reset();
          form.querySelectorAll("[data-confirm-name]").forEach(function (b) { b.disabled = true; });
        }
      });
    });

    // Copy buttons next to secrets shown once.
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var field = document.querySelector(button.getAttribute("data-copy"));
        if (!field || !navigator.clipboard) {
          return;
        }
        navigator.clipboard.writeText(field.value).then(function () {
          button.textContent = "Copied";
        });
      });
    });

    // While something is under way, look again every few seconds, unless the user
    // is in the middle of a dialog or a form.
    var every = parseInt(document.body.getAttribute("data-auto-refresh") || "0", 10);
    if (every > 0) {
      window.setInterval(function () {
        var busy = document.querySelector(".modal.show") ||
          (document.activeElement && document.activeElement.closest("form"));
        if (!busy && !document.hidden) {
          window.location.reload();
        }
      }, every * 1000);
    }
  });
})();
