// Carousel sample script 3: marks that it loaded.
document.documentElement.dataset.script3 = 'loaded';
